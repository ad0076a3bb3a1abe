"""A strict structural check of zip archives, so that the registry's vetting and torch read the same members.

The registry vets archives with Python's ``zipfile``; torch reads them with miniz
(``torch._C.PyTorchFileReader``). The two disagree on malformed archives: ``zipfile`` treats a central
directory offset that ends before the end record as prepended data ("concat") and shifts every offset,
miniz reads the directory at the recorded offset; ``zipfile`` takes the last of two members with the
same name, miniz the first, matching names case-insensitively; ``zipfile`` cuts names at a NUL byte.
So a file could show the vetting code one benign archive and torch another.

:func:`check_archive` therefore accepts only the shape torch's writer produces, where every byte of the
file is accounted for exactly once:

- local header, data and data descriptor of each member back to back from offset 0 (the local extra
  field may carry torch's 64-byte alignment padding), then the central directory, then (zip64) the zip64
  end record and its locator, then a 22-byte end record with no comment that ends the file;
- one end-of-central-directory record that could parse in the last 64 KiB + 22 bytes; one disk; entry
  counts, sizes and offsets that agree between the end records, the central directory and every local
  header; 0xFFFF/0xFFFFFFFF markers only where a zip64 record or field supplies the value;
- member names that are unique even ignoring case, relative, without ``..``, backslashes or control
  characters; no encryption; stored or deflate only;
- no decompression bomb: a deflated member may declare at most ``MAX_RATIO`` x its compressed size +
  ``RATIO_SLACK``, all members together at most ``TOTAL_FACTOR`` x the archive + ``TOTAL_SLACK``, and each
  deflated member is inflated (bounded by those limits) to check its size and CRC. torch stores tensors
  uncompressed, so its archives are far inside these bounds.
"""

from __future__ import annotations

import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, NoReturn

from registry.errors import FormatError

#: A deflated member may declare at most MAX_RATIO x its compressed size + RATIO_SLACK bytes.
MAX_RATIO = 100
RATIO_SLACK = 1 << 20
#: All members together may declare at most TOTAL_FACTOR x the archive's size + TOTAL_SLACK bytes.
TOTAL_FACTOR = 10
TOTAL_SLACK = 64 << 20
#: Largest central directory read into memory (about 3 million members).
MAX_CENTRAL_DIR = 256 << 20

_RESAVE = "re-save the model with torch.save / torch.jit.save / torch.export.save"

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_LOCATOR = struct.Struct("<IIQI")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_DESC32 = struct.Struct("<IIII")
_DESC64 = struct.Struct("<IIQQ")
_LOCAL_SIG, _CENTRAL_SIG, _DESC_SIG = 0x04034B50, 0x02014B50, 0x08074B50
_EOCD_SIG, _EOCD64_SIG = 0x06054B50, 0x06064B50
_EOCD_MAGIC, _LOCATOR_MAGIC = b"PK\x05\x06", b"PK\x06\x07"
_EOCD64_BODY = _EOCD64.size - 12  # the record's "size of record" field excludes its first 12 bytes
_U16, _U32 = 0xFFFF, 0xFFFFFFFF
_ZIP64_ID = 0x0001

_ENCRYPTED = 0x0001 | 0x0040 | 0x2000  # traditional, strong, and central-directory encryption
_DESCRIPTOR = 0x0008
_UTF8 = 0x0800
_FLAGS = 0x0002 | 0x0004 | _DESCRIPTOR | _UTF8  # deflate options, data descriptor, UTF-8 names
_STORED, _DEFLATED = 0, 8
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class _Entry:
    raw: bytes
    name: str
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    offset: int


@contextmanager
def open_zip(f: IO[bytes], label: str) -> Iterator[zipfile.ZipFile]:
    """:func:`check_archive` ``f``, then open it with ``zipfile`` and require it to list the same members.

    Raises:
        FormatError: the archive is refused, or zipfile lists other members than the check parsed.
    """
    names = check_archive(f, label)
    with zipfile.ZipFile(f) as zf:
        if zf.namelist() != names:  # belt and braces: the check and zipfile must have read one directory
            _fail(label, "Python's zipfile lists other members than its central directory holds")
        yield zf


def check_archive(f: IO[bytes], label: str) -> list[str]:
    """Refuse a zip archive that two zip readers could read differently; return its member names.

    ``f`` is an open, seekable binary file (callers pass the descriptor they go on to read). Only the
    end records, the central directory, the local headers and deflated members are read; stored data
    (tensor bytes) is not.

    Args:
        f: the archive.
        label: how errors name it.

    Returns:
        The member names in central-directory order, as ``zipfile.ZipFile.namelist()`` gives them.

    Raises:
        FormatError: the archive is malformed, ambiguous, encrypted, uses another compression method
            or is a decompression bomb (see the module docstring for the exact rules).
    """
    size = f.seek(0, 2)
    cd_offset, cd_size, count = _end_records(f, size, label)
    entries = _central_directory(_read(f, cd_offset, cd_size, label), count, label)
    _unique(entries, label)
    _members(f, entries, cd_offset, size, label)
    return [e.name for e in entries]


def _fail(label: str, problem: str) -> NoReturn:
    raise FormatError(f"{label} is a damaged zip archive ({problem}); {_RESAVE}")


def _read(f: IO[bytes], offset: int, n: int, label: str) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        _fail(label, f"it is truncated (wanted {n} bytes at offset {offset})")
    return data


def _end_records(f: IO[bytes], size: int, label: str) -> tuple[int, int, int]:
    """The central directory's offset, size and entry count, from end records that must agree."""
    if size < _EOCD.size:
        _fail(label, "it is too short to hold an end-of-central-directory record")
    eocd = size - _EOCD.size
    start = max(0, eocd - _U16)
    tail = _read(f, start, size - start, label)
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, eocd - start)
    if sig != _EOCD_SIG:
        at = tail.rfind(_EOCD_MAGIC)
        if 0 <= at <= len(tail) - _EOCD.size and at + _EOCD.size + _EOCD.unpack_from(tail, at)[7] == len(tail):
            _fail(label, "it has an archive comment")
        _fail(label, "its end-of-central-directory record is not at the very end (trailing data)")
    if comment:
        _fail(label, "its end record announces a comment that the file does not hold")
    # Readers that search for the end record could settle on another one whose comment reaches the end.
    at = tail.find(_EOCD_MAGIC)
    while 0 <= at < eocd - start:
        if at + _EOCD.size <= len(tail) and at + _EOCD.size + _EOCD.unpack_from(tail, at)[7] == len(tail):
            _fail(label, f"a second end-of-central-directory record could be read at offset {start + at}")
        at = tail.find(_EOCD_MAGIC, at + 1)
    if disk or cd_disk:
        _fail(label, "it spans several disks")
    if n_disk != n_total:
        _fail(label, "its end record counts members on this disk and in total differently")
    cd_end = eocd
    locator = eocd - _LOCATOR.size
    # Python's zipfile and miniz both take a locator right before the end record to mean zip64.
    if locator >= 0 and tail[locator - start : locator - start + 4] == _LOCATOR_MAGIC:
        n64, cd_size64, cd_offset64, cd_end = _zip64(f, locator, label)
        # The 32-bit fields hold the value or, where zip64 supplies it, the marker; never something else.
        pairs = ((n_total, n64, _U16), (cd_size, cd_size64, _U32), (cd_offset, cd_offset64, _U32))
        if any(v32 not in (v64, marker) for v32, v64, marker in pairs):
            _fail(label, "its end record and zip64 end record disagree")
        n_total, cd_size, cd_offset = n64, cd_size64, cd_offset64
    elif _U16 == n_total or _U32 in (cd_size, cd_offset):
        _fail(label, "its end record uses zip64 markers but there is no zip64 end record")
    if cd_offset + cd_size != cd_end:
        # The defect this module exists for: zipfile would shift every offset, miniz would not.
        _fail(label, f"its central directory (offset {cd_offset}, {cd_size} bytes) does not end where the "
                     f"end records start (offset {cd_end}), so readers would find different directories")
    if not n_total:
        _fail(label, "it has no members")
    if cd_size > MAX_CENTRAL_DIR or n_total * _CENTRAL.size > cd_size:
        _fail(label, f"its central directory of {cd_size} bytes cannot hold {n_total} members or is too large")
    return cd_offset, cd_size, n_total


def _zip64(f: IO[bytes], locator: int, label: str) -> tuple[int, int, int, int]:
    """Entry count, central directory size and offset, and position of a zip64 end record."""
    _, disk, record_offset, disks = _LOCATOR.unpack(_read(f, locator, _LOCATOR.size, label))
    record = locator - _EOCD64.size
    if disk or disks != 1:
        _fail(label, "its zip64 locator says it spans several disks")
    if record < 0 or record_offset != record:
        # zipfile reads the record right before the locator, miniz at the recorded offset.
        _fail(label, "its zip64 locator does not point at a zip64 end record right before it")
    sig, body, _, _, rdisk, cd_disk, n_disk, n_total, cd_size, cd_offset = _EOCD64.unpack(
        _read(f, record, _EOCD64.size, label))
    if sig != _EOCD64_SIG or body != _EOCD64_BODY:
        _fail(label, "its zip64 end record is missing or carries extensible data")
    if rdisk or cd_disk:
        _fail(label, "its zip64 end record says it spans several disks")
    if n_disk != n_total:
        _fail(label, "its zip64 end record counts members on this disk and in total differently")
    return n_total, cd_size, cd_offset, record


def _central_directory(data: bytes, count: int, label: str) -> list[_Entry]:
    entries: list[_Entry] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _CENTRAL.size:
            _fail(label, "its central directory ends in the middle of an entry")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, _,
         offset) = _CENTRAL.unpack_from(data, pos)
        if sig != _CENTRAL_SIG:
            _fail(label, f"its central directory holds something other than entries at byte {pos}")
        end = pos + _CENTRAL.size + nlen + elen + clen
        if end > len(data):
            _fail(label, "its central directory ends in the middle of an entry")
        raw = data[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]
        name = _name(raw, flags, label)
        if clen:
            _fail(label, f"member {name!r} has a comment")
        if disk:
            _fail(label, f"member {name!r} says it starts on another disk")
        _check_flags(flags, method, name, label)
        z64 = _extra_fields(data[pos + _CENTRAL.size + nlen : end - clen], name, label).get(_ZIP64_ID)
        # zipfile and miniz both read a zip64 field as one 8-byte value per 0xFFFFFFFF marker, in this order.
        marked = [v == _U32 for v in (usize, csize, offset)]
        if z64 is not None or any(marked):
            if z64 is None or len(z64) != 8 * sum(marked):
                _fail(label, f"member {name!r} has zip64 markers and a zip64 field that do not match")
            values = iter(struct.unpack(f"<{sum(marked)}Q", z64))
            usize, csize, offset = (next(values) if m else v for m, v in zip(marked, (usize, csize, offset),
                                                                                strict=True))
        if method == _STORED and csize != usize:
            _fail(label, f"member {name!r} is stored but its sizes differ ({csize} and {usize})")
        entries.append(_Entry(raw, name, flags, method, crc, csize, usize, offset))
        pos = end
    if len(entries) != count:
        _fail(label, f"its end record counts {count} members but its central directory holds {len(entries)}")
    return entries


def _name(raw: bytes, flags: int, label: str) -> str:
    """A member name as zipfile decodes it; only names every reader decodes and resolves alike pass."""
    try:
        # Without the UTF-8 flag zipfile decodes cp437; ASCII reads the same either way.
        name = raw.decode("utf-8" if flags & _UTF8 else "ascii")
    except UnicodeDecodeError:
        _fail(label, f"member name {raw!r:.80} is not valid {'UTF-8' if flags & _UTF8 else 'ASCII'}")
    if any(unicodedata.category(c) == "Cc" for c in name):
        _fail(label, f"member name {name!r:.80} contains control characters")  # zipfile cuts names at NUL
    if "\\" in name:
        _fail(label, f"member name {name!r:.80} contains a backslash")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isascii() and name[0].isalpha()):
        _fail(label, f"member name {name!r:.80} is an absolute path")
    parts = name.removesuffix("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        _fail(label, f"member name {name!r:.80} has an empty, '.' or '..' component")
    return name


def _check_flags(flags: int, method: int, name: str, label: str) -> None:
    if flags & _ENCRYPTED:
        _fail(label, f"member {name!r} is encrypted")
    if flags & ~_FLAGS:
        _fail(label, f"member {name!r} uses general-purpose flags {flags:#06x}")
    if method not in (_STORED, _DEFLATED):
        _fail(label, f"member {name!r} uses compression method {method} (only stored and deflate are accepted)")


def _extra_fields(extra: bytes, name: str, label: str) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if len(extra) - pos < 4:
            _fail(label, f"member {name!r} has a malformed extra field")
        kind, n = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + n > len(extra):
            _fail(label, f"member {name!r} has a malformed extra field")
        if kind in fields:  # zipfile reads every copy of a field, miniz the first
            _fail(label, f"member {name!r} has two extra fields of type {kind:#06x}")
        fields[kind] = extra[pos + 4 : pos + 4 + n]
        pos += 4 + n
    return fields


def _unique(entries: list[_Entry], label: str) -> None:
    # miniz matches names ignoring ASCII case (bytes.lower); casefold also covers what Python code may fold.
    seen: dict[bytes | str, str] = {}
    for e in entries:
        for key in (e.raw.lower(), e.name.casefold()):
            if key in seen:
                raise FormatError(f"{label} has duplicate member names ({seen[key]!r} and {e.name!r} are the same "
                                  f"ignoring case), so loaders disagree on it; {_RESAVE}")
            seen[key] = e.name


def _members(f: IO[bytes], entries: list[_Entry], cd_offset: int, size: int, label: str) -> None:
    """Walk the members in file order: each must start where the previous one ended, the first at 0."""
    expected = 0
    declared = 0
    for e in sorted(entries, key=lambda e: e.offset):
        if e.offset != expected:
            if e.offset < expected:
                _fail(label, f"member {e.name!r} overlaps the member before it")
            where = f"before member {e.name!r}" if expected else "before the first member"
            _fail(label, f"{e.offset - expected} bytes that belong to no member lie {where}")
        declared += e.usize
        if declared > TOTAL_FACTOR * size + TOTAL_SLACK:
            _fail(label, f"its members declare more than {TOTAL_FACTOR}x the archive's size + "
                         f"{TOTAL_SLACK >> 20} MiB uncompressed (a decompression bomb)")
        expected = _member(f, e, label)
    if expected != cd_offset:
        if expected > cd_offset:
            _fail(label, "its last member runs into the central directory")
        _fail(label, f"{cd_offset - expected} bytes that belong to no member lie before the central directory")


def _member(f: IO[bytes], e: _Entry, label: str) -> int:
    """Check one member's local header, data and descriptor against its directory entry; return its end."""
    sig, _, flags, method, _, _, crc, csize, usize, nlen, elen = _LOCAL.unpack(_read(f, e.offset, _LOCAL.size, label))
    if sig != _LOCAL_SIG:
        _fail(label, f"member {e.name!r} has no local header at offset {e.offset}")
    rest = _read(f, e.offset + _LOCAL.size, nlen + elen, label)
    if rest[:nlen] != e.raw:
        _fail(label, f"member {e.name!r} is called {rest[:nlen]!r:.80} in its local header")
    if (flags, method) != (e.flags, e.method):
        _fail(label, f"member {e.name!r} has other flags or another compression method in its local header")
    fields = _extra_fields(rest[nlen:], e.name, label)
    local = (crc, csize, usize)
    # torch's writer (miniz) leaves CRC and sizes zero and writes them in a data descriptor after the data.
    if not (flags & _DESCRIPTOR and local == (0, 0, 0)):
        marked = [v == _U32 for v in (usize, csize)]
        z64 = fields.get(_ZIP64_ID, b"")
        if any(marked):
            if len(z64) < 8 * sum(marked):
                _fail(label, f"member {e.name!r} has zip64 markers but no zip64 sizes in its local header")
            values = iter(struct.unpack_from(f"<{sum(marked)}Q", z64))
            usize, csize = (next(values) if m else v for m, v in zip(marked, (usize, csize), strict=True))
        if (crc, csize, usize) != (e.crc, e.csize, e.usize):
            _fail(label, f"member {e.name!r} has another CRC or size in its local header")
    start: int = e.offset + _LOCAL.size + nlen + elen
    if e.method == _DEFLATED:
        _inflate(f, start, e, label)
    end = start + e.csize
    if flags & _DESCRIPTOR:
        # miniz writes 64-bit sizes in the descriptor exactly when the local header has a zip64 field.
        form = _DESC64 if _ZIP64_ID in fields else _DESC32
        dsig, dcrc, dcsize, dusize = form.unpack(_read(f, end, form.size, label))
        if (dsig, dcrc, dcsize, dusize) != (_DESC_SIG, e.crc, e.csize, e.usize):
            _fail(label, f"member {e.name!r} has a missing data descriptor or one that disagrees with the directory")
        end += form.size
    return end


def _inflate(f: IO[bytes], start: int, e: _Entry, label: str) -> None:
    """Inflate a deflated member (within its declared size) and check its size and CRC."""
    if e.usize > MAX_RATIO * e.csize + RATIO_SLACK:
        _fail(label, f"member {e.name!r} declares {e.usize} bytes from {e.csize} compressed, more than "
                     f"{MAX_RATIO}x + {RATIO_SLACK >> 20} MiB (a decompression bomb)")
    f.seek(start)
    inflater = zlib.decompressobj(-15)
    left, out, crc = e.csize, 0, 0
    try:
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                _fail(label, f"member {e.name!r} is truncated")
            left -= len(chunk)
            while chunk:
                piece = inflater.decompress(chunk, e.usize + 1 - out)  # never more than one byte too many
                out, crc = out + len(piece), zlib.crc32(piece, crc)
                if out > e.usize:
                    _fail(label, f"member {e.name!r} inflates to more than its declared {e.usize} bytes")
                chunk = inflater.unconsumed_tail
    except zlib.error as err:
        _fail(label, f"member {e.name!r} has a damaged deflate stream ({err})")
    if out != e.usize or crc != e.crc or not inflater.eof or inflater.unused_data or left:
        _fail(label, f"member {e.name!r} does not inflate to its declared size and CRC")
