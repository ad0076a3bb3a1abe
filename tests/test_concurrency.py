"""Many OS processes writing at the same moment, on a SQLite file and on PostgreSQL: exact final state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import Registry
from tests.processes import model_files, ok_json, registry_env, run_together, sha256

PUSHERS = 16
PROMOTERS = 10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return model_files(tmp_path_factory.mktemp("models"), PUSHERS)


def test_concurrent_pushes_to_one_name_get_versions_1_to_n(
    db_url: str, tmp_path: Path, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # A new database too: the processes also race to create the schema on first use.
    env = registry_env(db_url, tmp_path / "artifacts")
    results, seconds = run_together([["-q", "--json", "push", "net", str(f)] for f in files], env,
                                    tmp_path / "push")
    for rc, _out, err in results:
        assert rc == 0 and err == "", err
    pushed = {json.loads(out)["version"]: json.loads(out)["sha256"] for _rc, out, _err in results}
    expected = {json.loads(out)["version"]: sha256(f) for f, (_rc, out, _err) in zip(files, results, strict=True)}
    assert sorted(pushed) == list(range(1, PUSHERS + 1))
    assert pushed == expected  # each process got its own blob under the number it was told

    listed = ok_json(["list", "net", "--limit", "100"], env)
    assert {v["version"]: v["sha256"] for v in listed} == expected
    assert ok_json(["verify"], env) == []
    with capsys.disabled():
        print(f"\n{PUSHERS} concurrent pushes on {db_url.split(':')[0]}: {seconds:.2f}s")


def test_concurrent_promotions_apply_one_after_another(
    db_url: str, tmp_path: Path, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "artifacts"
    with Registry(db=db_url, storage=storage) as reg:
        for f in files[:PROMOTERS]:
            reg.push("net", f)
    env = registry_env(db_url, storage)
    results, seconds = run_together(
        [["-q", "--json", "promote", "net", "--version", str(v), "--reason", f"job {v}"]
         for v in range(1, PROMOTERS + 1)], env, tmp_path / "promote")
    for rc, _out, err in results:
        assert rc == 0 and err == "", err
    told = sorted((json.loads(out)["version"], json.loads(out)["previous"]) for _rc, out, _err in results)

    with Registry(db=db_url, storage=storage) as reg:
        history = reg.history("net")
        aliases = {v.version: v.aliases for v in reg.versions("net")}
    # Every move is recorded, each starting from where the one before it left the alias.
    assert sorted(e.version for e in history if e.version is not None) == list(range(1, PROMOTERS + 1))
    assert [e.previous for e in history] == [None] + [e.version for e in history[:-1]]
    assert all(e.alias == "production" and e.reason == f"job {e.version}" for e in history)
    assert sorted((e.version, e.previous) for e in history) == told  # what each process was told
    # ... and the alias ends on exactly one version: the last one applied.
    assert [v for v, names in aliases.items() if "production" in names] == [history[-1].version]
    with capsys.disabled():
        print(f"\n{PROMOTERS} concurrent promotions on {db_url.split(':')[0]}: {seconds:.2f}s")
