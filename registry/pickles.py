"""Pickle opcode scanning and model-file format detection, without executing or importing anything."""

from __future__ import annotations

import _compat_pickle
import io
import json
import os
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from registry import ziparchive
from registry.errors import FormatError, one_line
from registry.records import Format
from registry.trust import has_dunder

Global = tuple[str, str]

#: Largest pickle member read into memory (zip bomb guard).
_MAX_PICKLE_BYTES = 1 << 30
#: Largest safetensors JSON header, the limit the safetensors library itself enforces.
_MAX_SAFETENSORS_HEADER = 100_000_000

_ZIP_MAGIC = b"PK\x03\x04"
_Members = list[tuple[zipfile.ZipInfo, str]]  # each member with its lower-cased path below the root
# Payload configs of a .pt2 (torch/export/pt2_archive/constants.py), by folder.
_PT2_CONFIGS = {"data/weights": "_weights_config.json", "data/constants": "_constants_config.json"}
_STR_OPS = frozenset({"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})
# Python 2 strings become str only with an ASCII-compatible encoding; anything else is not trusted as a name.
_PY2_STR_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# EXTn import a global named by copyreg's extension registry, which the bytes do not show.
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_MARK, _ANY = object(), object()

# Deny-list, defence in depth only: trust is decided by allow-lists elsewhere. It looks at the dotted path
# alone (after Python 2 name fixing), so pairs and the names in Detected.globals_ get the same answer.
# Dangerous: a path rooted in a process, file, network, import, code-evaluation or pickle module; a path
# through one of the _ANYWHERE modules at any depth (protocol 4 resolves ("torch", "os.system") attribute
# by attribute, and torch.os is the os module); a listed builtin or dotted path; any dunder component.
_DANGEROUS_MODULES = frozenset("""
    os posix nt posixpath ntpath subprocess _posixsubprocess sys runpy pickle _pickle cPickle dill
    cloudpickle joblib shelve marshal shutil socket _socket ssl urllib http ftplib smtplib telnetlib requests
    importlib imp pkgutil zipimport ctypes _ctypes cffi code codeop types pty webbrowser multiprocessing
    _multiprocessing asyncio threading _thread platform signal _signal tempfile io _io pathlib fileinput gzip
    bz2 lzma zipfile tarfile dbm sqlite3 logging timeit pdb bdb trace profile cProfile doctest ensurepip venv
    pip setuptools distutils commands popen2
""".split())
# No legitimate model path has these below its root ("_pickle", "io" stay out: torch.jit._pickle exists).
_ANYWHERE = frozenset(
    "os posix nt subprocess sys builtins pickle shutil socket importlib ctypes runpy marshal pty".split()
)
_DANGEROUS_BUILTINS = frozenset("""
    eval exec execfile compile getattr setattr delattr open file __import__ globals locals vars input
    raw_input breakpoint exit quit reload apply
""".split())
_DANGEROUS_PATHS = tuple(p.split(".") for p in """
    functools.partial _functools.partial functools.reduce _functools.reduce operator.attrgetter
    operator.itemgetter operator.methodcaller _operator.attrgetter _operator.itemgetter _operator.methodcaller
    torch.load torch.serialization.load torch.jit.load torch.jit._serialization.load torch.export.load
    torch.hub torch.package torch.utils.cpp_extension numpy.load numpy.lib.npyio.load numpy.ctypeslib
    numpy.testing._private.utils.runstring
""".split())

# What torch 2.13's weights_only unpickler accepts by default (torch/_weights_only_unpickler.py
# _get_allowed_globals): a data.pkl that references nothing else holds tensors and plain containers only.
_LEGACY_TYPES = (
    "Double Float Half BFloat16 Long Int Short Char Byte Bool ComplexDouble ComplexFloat "
    "QUInt8 QInt8 QInt32 QUInt4x2 QUInt2x4"
).split()
_DTYPES = (
    "bool uint8 uint16 uint32 uint64 int8 int16 int32 int64 float16 bfloat16 float32 float64 complex32 "
    "complex64 complex128 qint8 quint8 qint32 quint4x2 quint2x4 float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
    "float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2 bits8 bits16 bits1x8 bits2x4 bits4x2 per_tensor_affine "
    "per_tensor_symmetric per_channel_affine per_channel_symmetric per_channel_affine_float_qparams"
).split() + [f"{s}int{n}" for s in ("", "u") for n in range(1, 8)]
_REBUILDERS = (
    "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter _rebuild_parameter_with_state "
    "_rebuild_qtensor _rebuild_sparse_tensor _rebuild_meta_tensor_no_storage _rebuild_nested_tensor "
    "_rebuild_wrapper_subclass _rebuild_device_tensor_from_numpy _rebuild_device_tensor_from_cpu_tensor"
).split()
_STATE_DICT_GLOBALS = frozenset(
    {
        "collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.bytearray",
        "builtins.set", "builtins.complex", "torch.Size", "torch.Tensor", "torch.device",
        "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
        "torch._tensor._rebuild_from_type_v2", "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
    }
    | {f"torch._utils.{f}" for f in _REBUILDERS}
    | {f"torch.{d}" for d in _DTYPES}
    # a superset of the legacy Storage/Tensor classes: names torch lacks cannot load anyway
    | {f"torch{ns}.{t}{k}" for ns in ("", ".cuda", ".sparse", ".cuda.sparse") for t in _LEGACY_TYPES
       for k in ("Storage", "Tensor")}
)

_NOT_A_MODEL = (
    "is not a PyTorch model file (expected a torch.save zip archive, a TorchScript archive, "
    "a .pt2 or a .safetensors file)"
)
_RESAVE = "re-save the model from a trusted copy with a current torch"
# Everything the zip and decompression layers raise for damaged archives; FileNotFoundError is raised earlier.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError,
               OSError, ValueError, KeyError, zlib.error, struct.error)


def global_name(g: Global) -> str:
    """``("torch.nn.modules.linear", "Linear")`` -> ``"torch.nn.modules.linear.Linear"``."""
    return f"{g[0]}.{g[1]}"


def scan_pickle(data: bytes) -> frozenset[Global]:
    """Every global a single pickle imports, found by walking its opcodes without executing them.

    Raises:
        FormatError: the pickle is malformed, truncated, followed by more bytes, or hides a global
            behind operands that are not constant strings; it is refused rather than guessed at.
    """
    return _scan(data, "pickle")


def parse_globals(names: Iterable[str]) -> list[Global]:
    """Dotted names (as in :attr:`Detected.globals_`) back as pairs, split after the first component.

    Where the module ends is not recorded; :func:`dangerous` looks only at the dotted path, so it agrees.
    """
    return [(module, name) for module, _, name in (n.partition(".") for n in names)]


def dangerous(globals_: Iterable[Global]) -> list[str]:
    """Sorted ``module.qualname`` names among ``globals_`` that are plainly dangerous to import."""
    return sorted({global_name(g) for g in globals_ if _is_dangerous(g)})


def outside_weights_only(names: Iterable[str]) -> list[str]:
    """Sorted names among ``names`` (as in :attr:`Detected.globals_`) beyond tensors and plain containers.

    That is everything torch's ``weights_only`` unpickler would not accept by default; loaders that
    unpickle without ``weights_only`` (``torch.export.load``) may be given only pickles where this is empty.
    """
    return sorted({n for n in names if n not in _STATE_DICT_GLOBALS})


#: Functions of ``torch.nn.functional`` implemented in C, pickled under ``torch._C._nn`` (a module holding
#: ``activation=F.gelu`` pickles one); all pure tensor functions. Those torch implements as methods of
#: ``torch._C._VariableFunctionsClass`` (``torch.tanh``) pickle through ``builtins.getattr`` and stay out.
TORCH_C_FUNCTIONS = frozenset(f"torch._C._nn.{n}" for n in (
    "avg_pool2d", "avg_pool3d", "elu_", "gelu", "hardtanh_", "leaky_relu_", "linear", "log_sigmoid", "one_hot",
    "scaled_dot_product_attention", "softplus", "softshrink",
))


def untrusted_globals(names: Iterable[str], trusted: Iterable[str]) -> list[str]:
    """Sorted names among ``names`` (as in :attr:`Detected.globals_`) a whole-model pickle needs trust for.

    The allow-list: torch's tensor-rebuild set and plain containers (what ``weights_only`` accepts),
    names under the trusted module prefixes (``torch.nn`` always), and :data:`TORCH_C_FUNCTIONS`.
    Everything else is code an author chose to reference, whatever its name suggests.
    """
    from registry.trust import is_trusted

    prefixes = tuple(trusted)
    out = set()
    for name in names:
        fixed = global_name(_normalize(parse_globals([name])[0]))
        if fixed in _STATE_DICT_GLOBALS or fixed in TORCH_C_FUNCTIONS or is_trusted(fixed, prefixes):
            continue
        out.add(name)
    return sorted(out)


@dataclass(frozen=True, slots=True)
class Detected:
    """What :func:`detect` found in a model file."""

    format: Format
    globals_: tuple[str, ...]  # sorted unique "module.qualname" over all pickle members scanned
    pickles: tuple[str, ...]  # archive members scanned; "outer!inner" inside a nested archive


def detect(path: str | os.PathLike[str], *, label: str | None = None) -> Detected:
    """Work out a model file's format from its bytes and scan every pickle it holds.

    Only the zip central directory and the pickle members are read, never tensor data.
    ``label`` names the file in errors (default: its base name).

    Raises:
        FormatError: the file is not a supported model format, or a pickle in it cannot be scanned.
        FileNotFoundError: ``path`` does not exist.
    """
    base = label if label is not None else os.path.basename(os.fspath(path))
    with open(path, "rb") as f:
        head = f.read(8)
        if _is_safetensors(f, head, os.fstat(f.fileno()).st_size):
            return Detected(Format.SAFETENSORS, (), ())
        if head.startswith(_ZIP_MAGIC):  # the test torch.load itself uses to pick the zip reader
            try:
                # Structure first: zipfile and torch's miniz must see the same members (ziparchive docstring).
                with ziparchive.open_zip(f, f"'{base}'") as zf:
                    return _detect_archive(zf, base)
            except FormatError:
                raise
            except _ZIP_ERRORS as e:
                raise FormatError(f"'{base}' is a damaged zip archive ({one_line(e)}); {_RESAVE}") from e
    if head[:1] == b"\x80":
        raise FormatError(
            f"'{base}' uses the legacy non-zip torch.save format, which is not accepted; load it in a "
            "trusted environment and re-save it with a current torch.save (the default zip format)"
        )
    raise FormatError(f"'{base}' {_NOT_A_MODEL}")


def _scan(data: bytes, what: str) -> frozenset[Global]:
    try:
        return _walk(data)
    except Exception as e:  # any parse failure at all means the bytes are not understood: fail closed
        raise FormatError(f"{what} could not be scanned ({one_line(e)}) and is refused; {_RESAVE}") from e


def _walk(data: bytes) -> frozenset[Global]:
    found: set[Global] = set()
    stack: list[object] = []
    memo: dict[object, object] = {}
    stream = io.BytesIO(data)
    for op, arg, pos in pickletools.genops(stream):
        name = op.name
        if name in _EXT_OPS:
            raise ValueError("it uses the copyreg extension registry")
        if name == "PROTO" and not (isinstance(arg, int) and 0 <= arg <= 5):
            raise ValueError(f"unknown protocol {arg}")
        g: Global | None = None
        if name in ("GLOBAL", "INST"):
            g = _read_global(data, pos or 0)
        elif name == "STACK_GLOBAL":
            operands = stack[-2:]
            if len(operands) != 2 or not all(type(x) is str for x in operands):
                raise ValueError(f"STACK_GLOBAL at byte {pos} has operands that are not constant strings")
            g = (str(operands[0]), str(operands[1]))
        if g is not None:
            found.add(g)
        popped = _step(op, arg, stack, memo)
        # Follow numbers and globals far enough to see a call that allocates a size the bytes only state.
        if name in _INT_OPS:
            stack[-1] = _INT
        elif name in ("GLOBAL", "STACK_GLOBAL") and g is not None:
            stack[-1] = _Callable(global_name(_normalize(g)))
        elif name in _TUPLE_OPS and any(p is _INT for p in popped):
            stack[-1] = _INT
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ") and popped:
            _check_call(popped[0], popped[1:], pos)
        elif name == "INST" and g is not None:
            _check_call(_Callable(global_name(_normalize(g))), popped, pos)
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} bytes follow the STOP opcode")
    return frozenset(found)


def _read_global(data: bytes, pos: int) -> Global:
    # Re-read the two lines exactly as pickle's load_global does, so names with spaces cannot be misread.
    end1 = data.index(b"\n", pos + 1)
    end2 = data.index(b"\n", end1 + 1)
    return data[pos + 1 : end1].decode("utf-8"), data[end1 + 1 : end2].decode("utf-8")


@dataclass(frozen=True, slots=True)
class _Callable:
    name: str  # a global, normalised


_INT = object()  # a number, or a tuple holding one
_INT_OPS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_TUPLE_OPS = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
# Allowed by weights_only, and given a number they allocate that many bytes before torch checks anything:
# a 1 kB pickle could ask for gigabytes. Legitimate pickles pass them a string (their content).
_SIZED_BY_NUMBER = frozenset({"builtins.bytearray", "builtins.bytes"})


def _check_call(fn: object, args: list[object], pos: int | None) -> None:
    if isinstance(fn, _Callable) and fn.name in _SIZED_BY_NUMBER and any(a is _INT for a in args):
        raise ValueError(f"it calls {fn.name} with a number at byte {pos}, which allocates that many bytes")


def _step(op: pickletools.OpcodeInfo, arg: object, stack: list[object], memo: dict[object, object]) -> list[object]:
    """Apply one opcode's stack effect symbolically, as pickletools.dis does; returns what it popped, in order.

    Values are str, a tracked marker or opaque."""
    name = op.name
    if name in _PUT_OPS:
        if not stack or stack[-1] is _MARK:
            raise ValueError(f"{name} with nothing to store")
        memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        return []
    if name in _GET_OPS:
        if arg not in memo:
            raise ValueError(f"memo key {arg} was never stored")
        stack.append(memo[arg])
        return []
    if name == "DUP":
        if not stack or stack[-1] is _MARK:
            raise ValueError("DUP on an empty stack")
        stack.append(stack[-1])
        return []
    before = list(op.stack_before)
    above: list[object] = []
    if pickletools.markobject in before or (name == "POP" and stack and stack[-1] is _MARK):
        if _MARK not in stack:
            raise ValueError(f"{name} without a MARK")
        while (item := stack.pop()) is not _MARK:
            above.append(item)
        above.reverse()
        before = before[: before.index(pickletools.markobject)] if pickletools.markobject in before else []
    if len(before) > len(stack) or any(x is _MARK for x in stack[len(stack) - len(before) :]):
        raise ValueError(f"{name} pops more than the stack holds")
    popped = stack[len(stack) - len(before) :] + above
    del stack[len(stack) - len(before) :]
    if name in _STR_OPS or (name in _PY2_STR_OPS and isinstance(arg, str) and arg.isascii()):
        stack.append(arg)
    else:
        stack.extend(_MARK if s is pickletools.markobject else _ANY for s in op.stack_after)
    return popped


def _normalize(g: Global) -> Global:
    """Apply the Python 2 renames pickle's fix_imports applies (``__builtin__`` -> ``builtins``, ...)."""
    mapped = _compat_pickle.NAME_MAPPING.get(g)
    return mapped or (_compat_pickle.IMPORT_MAPPING.get(g[0], g[0]), g[1])


def _is_dangerous(g: Global) -> bool:
    parts = global_name(_normalize(g)).split(".")
    # TorchScript archives name their compiled classes under the "__torch__" root.
    if has_dunder(".".join(parts[1:] if parts[0] == "__torch__" else parts)):
        return True
    if parts[0] in _DANGEROUS_MODULES or any(p in _ANYWHERE for p in parts[1:]):
        return True
    if parts[0] == "builtins" and parts[1] in _DANGEROUS_BUILTINS:
        return True
    return any(parts[: len(p)] == p for p in _DANGEROUS_PATHS)


def _is_safetensors(f: io.BufferedReader, head: bytes, size: int) -> bool:
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    if not 1 <= n <= _MAX_SAFETENSORS_HEADER or 8 + n > size or (header := f.read(n))[:1] != b"{":
        return False
    try:
        return isinstance(json.loads(header), dict)
    except (ValueError, RecursionError):  # a header nested past the recursion limit is no safetensors header
        return False



def _members(zf: zipfile.ZipFile, label: str) -> tuple[str, _Members]:
    """The single top-level folder of a torch zip and each member with its lower-cased path below it."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    folded = [i.filename.lower() for i in infos]
    roots = {i.filename.split("/", 1)[0] for i in infos}
    # torch's zip reader (miniz) matches names case-insensitively and takes the first duplicate while
    # zipfile takes the last, so a scan could read a different member than torch.load: refuse.
    if len(set(folded)) != len(folded):
        raise FormatError(f"{label} has duplicate member names, so loaders disagree on it; {_RESAVE}")
    if not infos or len(roots) != 1 or any("/" not in n for n in folded):
        return "", [(i, n) for i, n in zip(infos, folded, strict=True)]
    root = infos[0].filename.split("/", 1)[0]
    return root, [(i, n.split("/", 1)[1]) for i, n in zip(infos, folded, strict=True)]


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, limit: int | None = None) -> bytes:
    limit = _MAX_PICKLE_BYTES if limit is None else limit
    if info.file_size > limit:  # zipfile never returns more than the declared size
        raise FormatError(f"{label} is larger than {limit} bytes and is refused; {_RESAVE}")
    return zf.read(info)


def _is_pickle_name(rel: str) -> bool:
    return rel.endswith((".pkl", "_pkl"))


def _detect_archive(zf: zipfile.ZipFile, base: str) -> Detected:
    root, members = _members(zf, f"'{base}'")
    rels = {rel for _, rel in members}
    if not root:
        # torch.export.save before the pt2 archive format (torch 2.7 era): loose members, still loadable.
        if {"serialized_exported_program.json", "version"} <= rels:
            return _result(Format.EXPORT, _scan_pt2(zf, members, base, set(), set()))
        raise FormatError(f"'{base}' is a zip archive whose members are not under one top-level folder; "
                          f"it {_NOT_A_MODEL}")
    if "archive_format" in rels:
        info = next(i for i, rel in members if rel == "archive_format")
        if _read(zf, info, f"'{base}' member archive_format", 64).strip() != b"pt2":
            raise FormatError(f"'{base}' has an unknown archive_format; save it with torch.export.save")
        if any(rel.startswith("data/aotinductor/") for rel in rels):
            # torch.export.load would load the AOTInductor shared libraries: native code, never scanned.
            raise FormatError(f"'{base}' contains AOTInductor compiled code, which is refused; "
                              "save the program with torch.export.save instead")
        return _result(Format.EXPORT, _scan_pt2(zf, members, base, *_pt2_payloads(zf, members, base)))
    is_script = "constants.pkl" in rels or any(rel.startswith("code/") for rel in rels)
    if not is_script and "data.pkl" not in rels:
        raise FormatError(f"'{base}' is a zip archive without data.pkl or code/; it {_NOT_A_MODEL}")
    scans = {i.filename: _scan_member(zf, i, base, i.filename) for i, rel in members if _is_pickle_name(rel)}
    if is_script:
        return _result(Format.TORCHSCRIPT, scans)
    plain = all(global_name(_normalize(g)) in _STATE_DICT_GLOBALS for found in scans.values() for g in found)
    return _result(Format.STATE_DICT if plain else Format.FULL, scans)


def _pt2_payloads(zf: zipfile.ZipFile, members: _Members, base: str) -> tuple[set[str], set[str]]:
    """Members the pt2 weight/constant configs declare as raw tensor bytes, and as pickled."""
    raw: set[str] = set()
    pickled: set[str] = set()
    for info, rel in members:
        folder, _, leaf = rel.rpartition("/")
        suffix = _PT2_CONFIGS.get(folder)
        if suffix and leaf.endswith(suffix):
            label = f"'{base}' member {info.filename}"
            try:
                for meta in json.loads(_read(zf, info, label))["config"].values():
                    (pickled if meta["use_pickle"] else raw).add(f"{folder}/{meta['path_name']}".lower())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise FormatError(f"{label} is not a valid payload config ({one_line(e)}); {_RESAVE}") from e
    return raw - pickled, pickled  # a member any entry unpickles is scanned


def _scan_pt2(
    zf: zipfile.ZipFile, members: _Members, base: str, raw: set[str], pickled: set[str]
) -> dict[str, frozenset[Global]]:
    """Scan every pickle torch.export.load can unpickle, including those in nested torch.save archives."""
    scans: dict[str, frozenset[Global]] = {}
    for info, rel in members:
        if rel in raw:
            continue  # tensor bytes: never read
        with zf.open(info) as fh:
            magic = fh.read(4)
        if magic == _ZIP_MAGIC:
            with zf.open(info) as fh, ziparchive.open_zip(fh, f"'{base}' member {info.filename}") as inner:
                for inner_info, inner_rel in _members(inner, f"'{base}' member {info.filename}")[1]:
                    if _is_pickle_name(inner_rel):
                        name = f"{info.filename}!{inner_info.filename}"
                        scans[name] = _scan_member(inner, inner_info, base, name)
        elif rel in pickled or magic[:1] == b"\x80" or _is_pickle_name(rel) or _unpickled_payload(rel):
            # Fail closed: a payload that is neither raw tensor bytes nor a zip must scan as a pickle,
            # whatever its name or first byte (torch retries a failed weights_only load unrestricted).
            scans[info.filename] = _scan_member(zf, info, base, info.filename)
    return scans


def _unpickled_payload(rel: str) -> bool:
    """A .pt2 member under data/ other than a JSON config: torch.export.load may unpickle it."""
    return rel.startswith("data/") and not rel.endswith(".json")


def _scan_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, base: str, name: str) -> frozenset[Global]:
    label = f"'{base}' member {name}"
    return _scan(_read(zf, info, label), label)


def _result(fmt: Format, scans: dict[str, frozenset[Global]]) -> Detected:
    names = {global_name(g) for found in scans.values() for g in found}
    return Detected(fmt, tuple(sorted(names)), tuple(sorted(scans)))
