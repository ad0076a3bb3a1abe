"""S3 multipart uploads the registry can account for: markers that date them, and gc's view of them.

Every multipart upload the registry starts is recorded in a small marker object,
``PREFIX/uploads/<token>``, written before the upload is created and deleted once it completes or is
aborted. The marker holds the blob key, the upload id and the time the registry started the upload,
so gc needs neither ``ListMultipartUploads`` (s3rver answers 501) nor the server's ``Initiated`` date
(moto says 2010 for every upload) to find an abandoned upload and to leave a running one alone.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from registry import _testhooks, remote

#: Markers live beside ``blobs/``, never under it: gc's blob listing must not see them.
MARKER_PREFIX = "uploads"
LIFECYCLE_HINT = ("add the bucket lifecycle rule AbortIncompleteMultipartUpload "
                  "(e.g. DaysAfterInitiation 1) to have the server remove them")


@dataclass(frozen=True, slots=True)
class Upload:
    """An incomplete multipart upload under the registry's prefix."""

    key: str  # full key, bucket included, as fsspec names it
    upload_id: str
    started: float  # seconds since the epoch: the registry's marker, else the server's Initiated
    size: int  # bytes of the parts uploaded so far (the file's size where the server cannot list parts)
    marker: str | None = None  # full key of its marker, if the registry recorded it


@dataclass(slots=True)
class Scan:
    """What gc found: uploads older than the cutoff, markers left over, and what it could not look at."""

    old: list[Upload] = field(default_factory=list)
    stale_markers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Marker:
    key: str  # the marker's own full key
    blob: str  # full key of the blob being uploaded
    upload_id: str | None  # None: written just before the upload was created
    started: float
    size: int


class MultipartWriter:
    """A write-only file object sending ``size`` bytes to ``key``: one PUT, or a recorded multipart upload.

    Parts are exactly ``part_size`` bytes (the last one shorter), so at most one part is held in memory.
    Nothing appears under ``key`` until :meth:`close` completes the upload.
    """

    def __init__(self, fs: Any, root: str, key: str, size: int, part_size: int) -> None:
        self.fs, self.key, self.size, self.part_size = fs, key, size, part_size
        self.bucket, _, self.path = key.partition("/")
        self.marker = f"{root}/{MARKER_PREFIX}/{uuid.uuid4().hex}"
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.buffer = bytearray()
        self.started = time.time()

    def write(self, data: bytes | memoryview) -> int:
        self.buffer += data
        # A file that fits one part goes up in one PUT at close (unless it grew after it was hashed).
        while len(self.buffer) > self.part_size or (len(self.buffer) == self.part_size and self.size > self.part_size):
            self._send(bytes(self.buffer[: self.part_size]))
            del self.buffer[: self.part_size]
        return len(data)

    def close(self) -> None:
        """Send what is left and complete the upload: the object appears whole, or not at all."""
        if self.upload_id is None and not self.parts and self.size <= self.part_size:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.path, Body=bytes(self.buffer))
            return
        if self.buffer or not self.parts:
            self._send(bytes(self.buffer))
            self.buffer.clear()
        self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.path, UploadId=self.upload_id,
                        MultipartUpload={"Parts": self.parts})
        self._forget()

    def abort(self) -> str | None:
        """Abort the upload and remove its marker; None if nothing remains, else why parts remain.

        The marker stays when the abort fails, so ``registry gc`` finds the upload and tries again.
        """
        self.buffer.clear()
        if self.upload_id is None:
            self._forget()  # at most the marker was written
            return None
        try:
            abort(self.fs, self.key, self.upload_id)
        except Exception as e:  # the server is failing too, or cannot abort: say so
            return (f"the upload of {self.key} could not be aborted: {why(e)}; its parts remain on the server "
                    f"until 'registry gc' aborts it, or {LIFECYCLE_HINT}")
        self._forget()
        return None

    def _send(self, data: bytes) -> None:
        if self.upload_id is None:
            self._record()  # before the upload exists: gc never sees an upload of ours it cannot date
            self.upload_id = str(self.fs.call_s3("create_multipart_upload", Bucket=self.bucket,
                                                 Key=self.path)["UploadId"])
            self._record()
        number = len(self.parts) + 1
        answer = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.path, UploadId=self.upload_id,
                                 PartNumber=number, Body=data)
        self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        _testhooks.pause("uploading")  # Ctrl-C/kill tests: a multipart upload is open, a part sent

    def _record(self) -> None:
        body = {"key": self.key, "upload_id": self.upload_id, "started": self.started, "size": self.size}
        bucket, _, path = self.marker.partition("/")
        self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=json.dumps(body).encode())

    def _forget(self) -> None:
        try:
            bucket, _, path = self.marker.partition("/")
            self.fs.call_s3("delete_object", Bucket=bucket, Key=path)
        except Exception:  # noqa: S110 - a marker whose upload is gone is removed by the next gc
            pass


def abort(fs: Any, key: str, upload_id: str) -> None:
    """Abort one upload; already gone (completed or aborted meanwhile) counts as done."""
    bucket, _, path = key.partition("/")
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=path, UploadId=upload_id)
    except FileNotFoundError:  # NoSuchUpload
        pass


def can_abort(fs: Any, root: str) -> str | None:
    """None if the server aborts uploads, else why not (asks to abort an upload that does not exist)."""
    bucket, _, path = f"{root}/{MARKER_PREFIX}/probe".partition("/")
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=path, UploadId="registry-probe")
    except FileNotFoundError:
        return None  # NoSuchUpload: the operation exists
    except Exception as e:
        return why(e)
    return None


def scan(fs: Any, root: str, blob_prefix: str, cutoff: float) -> Scan:
    """Uploads started at or before ``cutoff`` (seconds since the epoch), from markers and the server's list.

    An upload the registry recorded is dated by its marker. One it did not (an older registry's, or one
    whose marker could not be written) is dated by the server. Each operation the server lacks becomes a
    warning, and the rest still runs.
    """
    found = Scan()
    markers = _markers(fs, f"{root}/{MARKER_PREFIX}")
    by_id = {m.upload_id: m for m in markers if m.upload_id is not None}
    # Blobs whose upload is being created right now (marker written, upload id not yet recorded).
    starting = {m.blob for m in markers if m.upload_id is None and m.started > cutoff}
    listed: set[str] | None = set()
    try:
        for key, upload_id, initiated in _list(fs, blob_prefix):
            assert listed is not None
            listed.add(upload_id)
            marker = by_id.get(upload_id)
            if marker is None and key in starting:
                continue
            started = marker.started if marker is not None else initiated
            if started <= cutoff:
                found.old.append(Upload(key, upload_id, started, _uploaded_bytes(fs, key, upload_id, 0),
                                        marker.key if marker is not None else None))
    except Exception as e:
        if not remote.unsupported(e):
            raise
        listed = None
        found.warnings.append(
            f"cannot list incomplete uploads: {why(e)}; only uploads this registry recorded under "
            f"{MARKER_PREFIX}/ were checked, any others stay until {LIFECYCLE_HINT}")
    for m in markers:
        if m.started > cutoff:
            continue
        if m.upload_id is None or (listed is not None and m.upload_id not in listed):
            found.stale_markers.append(m.key)  # its upload completed, was aborted, or was never created
        elif listed is None:
            found.old.append(Upload(m.blob, m.upload_id, m.started,
                                    _uploaded_bytes(fs, m.blob, m.upload_id, m.size), m.key))
    return found


def forget(fs: Any, marker: str) -> None:
    bucket, _, path = marker.partition("/")
    fs.call_s3("delete_object", Bucket=bucket, Key=path)


def why(e: BaseException) -> str:
    """What the server said, with the operation, one line (``NotImplemented`` and HTTP status included)."""
    cause = e if remote.client_error(e) is not None else e.__cause__
    info = remote.client_error(cause) if cause is not None else None
    if info is None:
        return " ".join((str(e) or type(e).__name__).split())
    operation, status, code, message = info
    return f"{operation} failed with HTTP {status} {code} ({message})"


def _markers(fs: Any, prefix: str) -> list[_Marker]:
    fs.invalidate_cache(prefix)
    try:
        keys = fs.ls(prefix, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for key in keys:
        try:
            data = json.loads(fs.cat_file(key))
            out.append(_Marker(key, str(data["key"]), data.get("upload_id"), float(data["started"]),
                               int(data.get("size", 0))))
        except FileNotFoundError:
            continue  # its upload finished since the listing
        except (ValueError, KeyError, TypeError):
            out.append(_Marker(key, "", None, 0.0, 0))  # not one of ours: never an upload, only removed
    return out


def _list(fs: Any, prefix: str) -> Iterator[tuple[str, str, float]]:
    """``(key, upload id, initiated)`` of the server's incomplete uploads under ``prefix``."""
    bucket, _, key_prefix = prefix.partition("/")
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        for upload in page.get("Uploads", []):
            yield f"{bucket}/{upload['Key']}", upload["UploadId"], upload["Initiated"].timestamp()
        if not page.get("IsTruncated"):
            return
        kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
        kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")


def _uploaded_bytes(fs: Any, key: str, upload_id: str, fallback: int) -> int:
    bucket, _, path = key.partition("/")
    total = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": path, "UploadId": upload_id}
    while True:
        try:
            page = fs.call_s3("list_parts", **kwargs)
        except FileNotFoundError:  # aborted or completed since it was listed
            return total
        except Exception as e:
            if remote.unsupported(e):  # s3rver: no ListParts; the file's size bounds what was sent
                return fallback
            raise
        total += sum(int(p.get("Size", 0)) for p in page.get("Parts", []))
        if not page.get("IsTruncated"):
            return total
        kwargs["PartNumberMarker"] = page["NextPartNumberMarker"]
