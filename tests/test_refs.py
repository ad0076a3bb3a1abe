from __future__ import annotations

import pytest

from registry.errors import InvalidName, InvalidReference
from registry.refs import Ref, parse_ref, validate_name

pytestmark = pytest.mark.fast  # in-process: part of `python -m pytest -m fast`


@pytest.mark.parametrize("name", ["mlp", "a", "A.b_c-9", "9lives", "x" * 128])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("../x", "must start with a letter or digit"),
        (".hidden", "must start with a letter or digit"),
        ("-flag", "must start with a letter or digit"),
        ("a b", "use only letters"),
        ("a/b", "use only letters"),
        ("a\nb", "use only letters"),
        ("a\x00b", "use only letters"),
        ("é", "must start with a letter or digit"),
        ("x" * 129, "longer than 128"),
    ],
)
def test_invalid_names(name: str, reason: str) -> None:
    with pytest.raises(InvalidName, match=reason):
        validate_name(name)


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("mlp", Ref("mlp")),
        ("mlp:3", Ref("mlp", version=3)),
        ("mlp:latest", Ref("mlp")),
        ("mlp@production", Ref("mlp", alias="production")),
    ],
)
def test_parse(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref
    assert str(ref) == text.replace(":latest", "")


def test_qualifiers() -> None:
    assert parse_ref("mlp", version=2) == Ref("mlp", version=2)
    assert parse_ref("mlp", alias="staging") == Ref("mlp", alias="staging")


@pytest.mark.parametrize("text", ["mlp:0", "mlp:-1", "mlp:x", "mlp:", "mlp:1.5"])
def test_bad_versions(text: str) -> None:
    with pytest.raises(InvalidReference, match="number >= 1"):
        parse_ref(text)


def test_version_named_twice() -> None:
    with pytest.raises(InvalidReference, match="more than once"):
        parse_ref("mlp:2", version=3)
    with pytest.raises(InvalidReference, match="more than once"):
        parse_ref("mlp@prod", version=3)


def test_bad_alias() -> None:
    with pytest.raises(InvalidName, match="invalid alias"):
        parse_ref("mlp@../x")


def test_versions_beyond_the_database_integer_are_refused() -> None:
    with pytest.raises(InvalidReference, match="number >= 1"):
        parse_ref("mlp:99999999999999999999")
    with pytest.raises(InvalidReference, match="invalid version"):
        parse_ref("mlp", version=2**31)


def test_latest_is_not_an_alias_name() -> None:
    with pytest.raises(InvalidName, match="reserved"):
        validate_name("latest", kind="alias")
    assert validate_name("latest") == "latest"  # a model may be called that
