from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from registry.errors import AlreadyExists, IntegrityError, StorageError
from registry.localstore import LocalStore
from registry.store import BlobStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(str(tmp_path / "artifacts"))


def _file(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_put_is_content_addressed_and_deduplicated(store: BlobStore, tmp_path: Path) -> None:
    data = b"weights" * 1000
    sha = hashlib.sha256(data).hexdigest()
    first = store.put_file(_file(tmp_path, data, "a"))
    second = store.put_file(_file(tmp_path, data, "b"))
    assert (first.sha256, first.size, first.written) == (sha, len(data), True)
    assert (second.sha256, second.written) == (sha, False)
    blob = Path(store.root) / "blobs" / "sha256" / sha[:2] / sha
    assert blob.read_bytes() == data
    assert [b.sha256 for b in store.iter_blobs()] == [sha]
    assert list((Path(store.root) / "tmp").iterdir()) == []  # no temporary file left behind


def test_put_reads_the_source_once(store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _file(tmp_path, b"x" * (3 * 4 * 1024 * 1024 + 5))
    opened: list[str] = []
    real_open = open

    def counting_open(path: object, mode: str = "r", *a: object, **k: object):  # type: ignore[no-untyped-def]
        if Path(str(path)) == src:
            opened.append(mode)
        return real_open(path, mode, *a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", counting_open)
    store.put_file(src)
    assert opened == ["rb"]


def test_open_verified_verifies(store: BlobStore, tmp_path: Path) -> None:
    blob = store.put_file(_file(tmp_path, b"abc"))
    with store.open_verified(blob.sha256, blob.size, artifact="m:1") as path:
        assert path.read_bytes() == b"abc"
    key = Path(store.key(blob.sha256))
    assert key.stat().st_mode & 0o777 == 0o444  # blobs are stored read-only
    key.chmod(0o644)
    key.write_bytes(b"abd")
    with pytest.raises(IntegrityError, match=f"artifact m:1 is corrupt: expected sha256 {blob.sha256}, got "):
        with store.open_verified(blob.sha256, blob.size, artifact="m:1"):
            pass


def test_missing_blob_is_a_storage_error(store: BlobStore) -> None:
    with pytest.raises(StorageError, match="artifact m:1 is missing from storage"):
        with store.open_verified("0" * 64, 1, artifact="m:1"):
            pass


def test_copy_to_is_atomic_and_verified(store: BlobStore, tmp_path: Path) -> None:
    blob = store.put_file(_file(tmp_path, b"payload"))
    dest = tmp_path / "out" / "m.pt"
    dest.parent.mkdir()
    assert store.copy_to(blob.sha256, blob.size, dest, artifact="m:1").read_bytes() == b"payload"
    with pytest.raises(AlreadyExists):
        store.copy_to(blob.sha256, blob.size, dest, artifact="m:1")
    Path(store.key(blob.sha256)).write_bytes(b"tampered")
    with pytest.raises(IntegrityError):
        store.copy_to(blob.sha256, blob.size, tmp_path / "out" / "n.pt", artifact="m:1")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.pt"]  # no partial file


def test_check_reports_missing_size_and_corrupt(store: BlobStore, tmp_path: Path) -> None:
    blob = store.put_file(_file(tmp_path, b"12345"))
    assert store.check(blob.sha256, blob.size) is None
    assert store.check(blob.sha256, 99)[0] == "size"  # type: ignore[index]
    Path(store.key(blob.sha256)).write_bytes(b"54321")
    assert store.check(blob.sha256, 5)[0] == "corrupt"  # type: ignore[index]
    store.delete(blob.sha256)
    assert store.check(blob.sha256, 5)[0] == "missing"  # type: ignore[index]


def test_keys_only_accept_hex_digests(store: BlobStore) -> None:
    for bad in ["../../etc/passwd", "A" * 64, "0" * 63]:
        with pytest.raises(ValueError):
            store.key(bad)


def test_pushing_good_bytes_again_repairs_a_corrupt_local_blob(store: BlobStore, tmp_path: Path) -> None:
    src = _file(tmp_path, b"weights" * 100)
    blob = store.put_file(src)
    Path(store.key(blob.sha256)).write_bytes(b"rotten" * 100 + b"w" * 100)  # same size, other bytes
    assert store.check(blob.sha256, blob.size)[0] == "corrupt"  # type: ignore[index]
    again = store.put_file(src)
    assert again.written is False  # deduplicated: no new blob
    assert store.check(blob.sha256, blob.size) is None  # but the file is the good copy again


def test_gc_listing_ignores_files_that_are_not_staging_files(store: LocalStore, tmp_path: Path) -> None:
    tmp = store.tmp_dir()
    (tmp / "notes.txt").write_text("not ours")
    (tmp / ("ab" * 16 + ".part")).write_bytes(b"half")
    assert [p.sha256 for p in store.iter_partials()] == ["ab" * 16 + ".part"]


def test_cache_clear_removes_only_what_the_cache_wrote(tmp_path: Path) -> None:
    from registry.cache import BlobCache

    cache = BlobCache(tmp_path / "cache")
    blob = cache.blobs.put_file(_file(tmp_path, b"cached"))
    mine = Path(cache.blobs.key(blob.sha256))
    foreign = [tmp_path / "cache" / "blobs" / "README", tmp_path / "cache" / "tmp" / "keep.txt",
               tmp_path / "cache" / "notes.txt"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not the cache's")
    removed = cache.clear()
    assert removed.blobs == 1 and not mine.exists()
    assert all(path.read_text() == "not the cache's" for path in foreign)
