"""Vetting a torch.export ``.pt2`` archive before ``torch.export.load`` reads it.

``torch.export.load`` is not a safe loader (its docstring says so). Read against torch 2.13:

- pickled weights and constants go through ``torch.load(weights_only=False)``, opaque constants through
  ``pickle.loads`` and custom-object constants through ``torch._C._pickle_load_obj``; which members are
  pickles is decided by the member's *name* as well as by the payload config's ``use_pickle`` flag, so
  a config can hide a pickle from a scan that trusts the flag;
- the program JSON is turned into code: every ``expr_str`` is parsed by ``sympy.sympify`` (which calls
  ``eval``), ``guards_code`` is ``exec``-ed when ``ExportedProgram.module()`` builds its guard function,
  input names end up inside that generated source, ``stack_trace`` lines end up in comments of the
  generated ``forward`` (a carriage return ends a comment for the Python tokenizer), and node targets
  are resolved by ``getattr`` from ``torch``, ``_operator`` and ``math`` (``torch.ops.import_module``,
  ``torch.os.system`` …) and called when the module runs.

So an archive is accepted only if it has exactly the layout ``torch.export.save`` writes (no custom or
opaque objects, no AOTInductor code, not the pre-2.8 layout), every pickle in it references only what
``weights_only`` allows by default (tensors and plain containers), and its program passes a strict
allow-list: expressions in a small grammar, no guard code, identifiers where names are expected,
targets from ``torch.ops`` and the arithmetic of ``_operator`` and ``math``.
"""

from __future__ import annotations

import io
import json
import re
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from registry import operators, pickles, ziparchive
from registry.errors import FormatError, UntrustedPickle, one_line

#: Largest program JSON read into memory.
MAX_PROGRAM_BYTES = 256 * 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024 * 1024
MAX_EXPR_CHARS = 10_000

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
#: Members (below the archive's root folder, lower-cased) that torch.export.save writes.
_LAYOUT = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
    rf"models/{_NAME}\.json", rf"data/weights/{_NAME}_weights_config\.json", r"data/weights/weight_\d+",
    rf"data/constants/{_NAME}_constants_config\.json", r"data/constants/tensor_\d+",
    rf"data/sample_inputs/{_NAME}\.pt", r"extra/.+",
)]
_PAYLOAD = {"data/weights": re.compile(r"weight_\d+"), "data/constants": re.compile(r"tensor_\d+")}

#: Bytes per element of torch.export's serialized ScalarType values (torch/_export/serde/schema.py).
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2, 28: 2, 29: 1, 30: 1,
             31: 1, 32: 1, 33: 1, 34: 4, 35: 8}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# Strings torch turns into Python (see the module docstring) may not contain line breaks a tokenizer
# honours; \n is allowed (stack traces are split on it before they reach generated code).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029\x85]")

_TARGET_OPS = re.compile(r"torch\.ops\.([A-Za-z_][A-Za-z0-9_]*)\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_OPS_METHODS = frozenset({"import_module", "load_library"})  # attributes of torch.ops, not namespaces
_TARGET_SYM = re.compile(r"torch\._?sym_[a-z_]+")
_TARGET_MATH = re.compile(r"math\.[a-z][a-z0-9_]*")
_OPERATORS = frozenset("""
    abs add and_ eq floordiv ge getitem gt invert is_ is_not le lshift lt matmul mod mul ne neg not_ or_ pos
    pow rshift sub truediv truth xor
""".split())

# The sympy expression grammar: capitalised names are sympy's and torch's expression classes
# (Symbol, Integer, FloorDiv, Max …); the lower-case names sympify would otherwise resolve include
# Python builtins (eval, getattr, chr), so only these and symbol names with a digit (s0, u12) pass.
_EXPR_CLASS = re.compile(r"[A-Z][A-Za-z0-9_]*")
_EXPR_SYMBOL = re.compile(r"[a-z][a-z_]*[0-9][a-z0-9_]*")
_EXPR_WORDS = frozenset("""
    true false oo zoo nan floor ceiling sqrt log exp positive negative nonnegative nonpositive integer real
    finite infinite zero nonzero even odd rational commutative precision evaluate
""".split())
_EXPR_OPS = frozenset("( ) , = + - * / ** // % < > <= >= == != & | ~ ^".split())
_EXPR_STRING = re.compile(r"[A-Za-z][A-Za-z0-9_]*|[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def vet(path: Path, *, label: str, detected: pickles.Detected | None = None) -> None:
    """Refuse a ``.pt2`` that ``torch.export.load`` could be made to run code from.

    Args:
        path: the archive.
        label: how errors name it.
        detected: the result of :func:`pickles.detect` for it, if already computed.

    Raises:
        FormatError: the layout, a payload config or the program JSON is not what torch.export.save writes.
        UntrustedPickle: a pickle in it references anything but tensors and plain containers.
    """
    detected = detected or pickles.detect(path)
    if detected.format.value != "export":
        raise FormatError(f"{label} is not a torch.export archive (its bytes are {detected.format.value})")
    outside = pickles.outside_weights_only(detected.globals_)
    if outside:
        raise UntrustedPickle(
            f"{label} is refused: a pickle in it (torch.export.load unpickles it without weights_only)", outside,
            hint="a .pt2 may only pickle tensors; re-save the program with torch.export.save",
        )
    try:
        with open(path, "rb") as f, ziparchive.open_zip(f, label) as zf:
            _check_archive(zf, label)
    except (FormatError, UntrustedPickle):
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, RuntimeError) as e:
        raise FormatError(f"{label} is a damaged .pt2 archive ({one_line(e)})") from e


def _check_archive(zf: zipfile.ZipFile, label: str) -> None:
    infos = [i for i in zf.infolist() if not i.is_dir()]
    roots = {i.filename.split("/", 1)[0] for i in infos}
    if len(roots) != 1 or any("/" not in i.filename for i in infos):
        raise FormatError(
            f"{label} has the pre-torch-2.8 .pt2 layout, which torch.export.load reads with an unrestricted "
            "unpickler; load it in a trusted environment and save it again with torch.export.save"
        )
    members = {i.filename.split("/", 1)[1].lower(): i for i in infos}
    for rel in members:
        if not any(p.fullmatch(rel) for p in _LAYOUT):
            raise FormatError(
                f"{label} contains {rel!r}, which torch.export.save does not write for a plain program "
                "(custom or opaque objects, compiled code and other payloads are refused)"
            )
    programs = [rel for rel in members if rel.startswith("models/")]
    if not programs:
        raise FormatError(f"{label} holds no program (models/*.json)")
    for rel, info in members.items():
        folder, _, leaf = rel.rpartition("/")
        if folder in _PAYLOAD and leaf.endswith("_config.json"):
            _check_config(_json(zf, info, f"{label} member {rel}", MAX_CONFIG_BYTES), folder, members, label, rel)
    for rel in programs:
        _check_program(_json(zf, members[rel], f"{label} member {rel}", MAX_PROGRAM_BYTES), f"{label} {rel}")


def _json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str, limit: int) -> Any:
    if info.file_size > limit:
        raise FormatError(f"{what} is larger than {limit} bytes and is refused")
    try:
        return json.loads(zf.read(info).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{what} is not valid JSON ({one_line(e)})") from e


def _check_config(config: Any, folder: str, members: dict[str, zipfile.ZipInfo], label: str, rel: str) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise FormatError(f"{label} member {rel} is not a payload config")
    for fqn, meta in entries.items():
        path_name = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(path_name, str) or not _PAYLOAD[folder].fullmatch(path_name.lower()):
            raise FormatError(f"{label} member {rel}: entry {fqn!r} names payload {path_name!r}, which is not "
                              "a tensor file torch.export.save writes")
        if f"{folder}/{path_name.lower()}" not in members:
            raise FormatError(f"{label} member {rel}: payload {path_name!r} of {fqn!r} is missing")
        if not isinstance(meta.get("use_pickle"), bool):
            raise FormatError(f"{label} member {rel}: entry {fqn!r} has no boolean use_pickle")
        _check_dotted(fqn, f"{label} member {rel}")
        if not meta["use_pickle"]:
            payload = members[f"{folder}/{path_name.lower()}"]
            _check_extent(meta.get("tensor_meta"), payload.file_size, f"{label} member {rel}: entry {fqn!r}")


def _check_extent(meta: Any, available: int, what: str) -> None:
    """Refuse tensor metadata that reaches past its payload: torch would allocate what it declares."""
    try:
        sizes = [int(d["as_int"]) for d in meta["sizes"]]
        strides = [int(d["as_int"]) for d in meta["strides"]]
        offset = int(meta["storage_offset"]["as_int"])
        itemsize = _ITEMSIZE[int(meta["dtype"])]
    except (TypeError, KeyError, ValueError) as e:
        raise FormatError(f"{what} has tensor metadata torch.export.save does not write ({one_line(e)})") from e
    if len(sizes) != len(strides) or min([offset, *sizes, *strides], default=0) < 0:
        raise FormatError(f"{what} has inconsistent tensor sizes and strides")
    if 0 in sizes:
        return
    needed = (offset + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True)) + 1) * itemsize
    if needed > available:
        raise FormatError(f"{what} declares a tensor of {needed} bytes but its payload holds {available}; refused "
                          "(loading would allocate what the metadata claims)")


def _check_program(program: Any, label: str) -> None:
    if not isinstance(program, dict):
        raise FormatError(f"{label} is not a serialized ExportedProgram")
    if program.get("guards_code"):
        raise FormatError(f"{label} carries guard code, which torch executes as Python when loading it; "
                          "export the program again with a current torch")
    for key in program.get("range_constraints") or {}:
        _check_ident(key, label)
    for key, value, parent in _walk(program):
        if isinstance(value, str) and _CONTROL.search(value):
            raise FormatError(f"{label}: the string under {key!r} contains control characters")
        if key in ("name", "as_name") and isinstance(value, str):
            _check_ident(value, label)
        elif key == "expr_str":
            _check_expr(value, label)
        elif key in ("in_spec", "out_spec") and isinstance(value, str):
            _check_treespec(value, label)
        elif key == "forward_arg_names":
            for name in value if isinstance(value, list) else [value]:
                _check_ident(name, label)
        elif (key.endswith("_name") or key == "fqn") and isinstance(value, str) and value:
            _check_dotted(value, label)
        elif (key == "target" and "inputs" in parent) or key == "as_operator":  # as_operator: resolved by getattr
            _check_target(value, label)
        elif key in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values",
                     "custom_obj_values") and isinstance(value, dict):
            for name in value:
                _check_ident(name, label)


def _walk(value: Any, key: str = "", parent: dict[str, Any] | None = None) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    # Iterative: a crafted program could nest deeper than the recursion limit.
    stack: list[tuple[str, Any, dict[str, Any]]] = [(key, value, parent or {})]
    while stack:
        key, value, parent = stack.pop()
        yield key, value, parent
        if isinstance(value, dict):
            for k, v in value.items():
                if _CONTROL.search(k):
                    raise FormatError(f"a key of the program contains control characters: {k!r:.60}")
                stack.append((k, v, value))
        elif isinstance(value, list):
            stack.extend((key, v, parent) for v in value)


def _check_ident(name: object, label: str) -> None:
    if not isinstance(name, str) or not _IDENT.fullmatch(name) or name.startswith("__"):
        raise FormatError(f"{label}: {name!r:.80} is not a plain identifier")


def _check_dotted(name: object, label: str) -> None:
    if not isinstance(name, str) or not _DOTTED.fullmatch(name) or any(p.startswith("__") for p in name.split(".")):
        raise FormatError(f"{label}: {name!r:.80} is not a dotted name of plain identifiers")


def _check_target(target: object, label: str) -> None:
    if isinstance(target, str):
        ops = _TARGET_OPS.fullmatch(target)
        if ops and ops.group(1) not in _OPS_METHODS and "__" not in target:
            why = operators.export_target_problem(target)  # the allow-list TorchScript code is held to
            if why is None:
                return
            raise FormatError(f"{label}: the program calls {target!r:.120}, which {why}; refused")
        if _TARGET_SYM.fullmatch(target) or _TARGET_MATH.fullmatch(target):
            return
        module, _, name = target.partition(".")
        if module == "_operator" and name in _OPERATORS:
            return
    raise FormatError(f"{label}: the program calls {target!r:.120}, which is not a torch operator; refused")


def _check_expr(expr: object, label: str) -> None:
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise FormatError(f"{label}: a symbolic expression is not a string of at most {MAX_EXPR_CHARS} characters")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError) as e:
        raise FormatError(f"{label}: symbolic expression {expr!r:.80} does not parse ({one_line(e)})") from e
    for tok in tokens:
        kind, text = tok.type, tok.string
        if kind in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
            continue
        if kind == tokenize.NAME and (
            _EXPR_CLASS.fullmatch(text) or _EXPR_SYMBOL.fullmatch(text) or text in _EXPR_WORDS
        ):
            continue
        if kind == tokenize.OP and text in _EXPR_OPS:
            continue
        if kind == tokenize.STRING and text[:1] in "'\"" and len(text) >= 2 and text[-1] == text[0]:
            inner = text[1:-1]
            if "\\" not in inner and _EXPR_STRING.fullmatch(inner):
                continue
        raise FormatError(f"{label}: symbolic expression {expr!r:.80} contains {text!r:.40}, which is outside "
                          "the expression grammar torch.export writes; refused (sympy would evaluate it)")


def _check_treespec(text: str, label: str) -> None:
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise FormatError(f"{label}: an input/output spec is not valid JSON ({one_line(e)})") from e
    for key, value, _ in _walk(spec):
        if key == "context" and isinstance(value, str):
            try:
                context = json.loads(value)
            except ValueError:
                context = value
            for _, item, _ in _walk(context):
                if isinstance(item, str):
                    _check_dotted(item, label)
