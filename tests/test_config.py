from __future__ import annotations

from pathlib import Path

import pytest

from registry.config import Settings, redact
from registry.errors import ConfigError

pytestmark = pytest.mark.fast  # in-process: part of `python -m pytest -m fast`


def test_defaults_live_under_registry_home(tmp_path: Path) -> None:
    s = Settings.resolve(environ={"REGISTRY_HOME": str(tmp_path), "USER": "ann"})
    assert s.db_url == f"sqlite:///{tmp_path / 'registry.db'}"
    assert s.storage_url == str(tmp_path / "artifacts")
    assert s.cache_dir == tmp_path / "cache"
    assert s.trusted_modules == ("torch.nn",)
    assert s.user == "ann"


def test_home_defaults_to_dot_registry() -> None:
    s = Settings.resolve(environ={"HOME": "/home/ann"})
    assert s.home == Path("~/.registry").expanduser()


def test_precedence_explicit_over_env_over_default(tmp_path: Path) -> None:
    env = {"REGISTRY_HOME": str(tmp_path), "REGISTRY_DB": "sqlite:///env.db", "REGISTRY_STORAGE": "s3://b/p",
           "REGISTRY_TRUSTED_MODULES": "mypkg.models, other", "REGISTRY_USER": "ci"}
    s = Settings.resolve(environ=env)
    assert (s.db_url, s.storage_url, s.user) == ("sqlite:///env.db", "s3://b/p", "ci")
    assert s.trusted_modules == ("mypkg.models", "other", "torch.nn")
    s = Settings.resolve(db="sqlite:///arg.db", storage="memory://x", trusted_modules=[], user="me", environ=env)
    assert (s.db_url, s.storage_url, s.user, s.trusted_modules) == (
        "sqlite:///arg.db", "memory://x", "me", ("torch.nn",))


def test_relative_storage_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings.resolve(storage="store", environ={}).storage_url == str(tmp_path / "store")


def test_storage_options_json() -> None:
    s = Settings.resolve(environ={"REGISTRY_STORAGE_OPTIONS": '{"key": "AK", "secret": "SK"}'})
    assert s.storage_options == {"key": "AK", "secret": "SK"}
    assert "SK" not in repr(s)
    with pytest.raises(ConfigError, match="REGISTRY_STORAGE_OPTIONS is not valid JSON"):
        Settings.resolve(environ={"REGISTRY_STORAGE_OPTIONS": "{nope"})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        Settings.resolve(environ={"REGISTRY_STORAGE_OPTIONS": "[1]"})


@pytest.mark.parametrize("bad", ["os:system", "__main__", "a..b", "1abc"])
def test_bad_trusted_prefix(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid trusted module prefix"):
        Settings.resolve(trusted_modules=[bad], environ={})


def test_redact_hides_passwords() -> None:
    assert redact("postgresql://bob:s3cret@db:5432/reg") == "postgresql://bob:***@db:5432/reg"
    assert redact("s3://bucket/prefix") == "s3://bucket/prefix"
    assert "s3cret" not in redact("https://AK:s3cret@host/x")
