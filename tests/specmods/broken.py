"""A trusted module whose import fails: resolving a class in it must name the failure."""

import registry_test_missing_dependency_xyz  # noqa: F401
