"""Importable user models for the spec tests (trusted as ``tests.specmods``)."""
