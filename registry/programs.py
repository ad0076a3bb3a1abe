"""What a TorchScript archive's code calls, read without torch: is it a data-only program?

``torch.jit.load`` compiles the archive's ``code/**/*.py`` members (TorchScript source, which is
Python syntax) and runs a scripted class's ``__setstate__`` while unpickling ``data.pkl``; calling the
module runs the rest. TorchScript can reach the file system through operators (``torch.from_file(p,
shared=True)`` then ``fill_`` writes a file; ``torch.save`` writes one) and C++ custom classes. So a
program is *data-only* when its code calls nothing but allowed operators (:mod:`registry.operators`),
defines no ``__setstate__``/``__getstate__`` and uses no ``torch.classes`` object.

How torch 2.13 resolves names in that source (``import_source.cpp``, ``ir_emitter.cpp``), and so how
each form is read here:

- ``torch.X`` is ``aten::X`` (``torch.autograd.X`` too); ``ops.NS.X`` is ``NS::X``. Every reference
  counts, called or not, so aliasing (``f = torch.save``) is no way around the check; a bare ``torch``
  or ``ops`` (passed as a value, or read with ``getattr``) is a problem.
- ``(v).X(...)`` on a value is the method ``aten::X`` of a tensor, list or string, or a method of a
  scripted class. A name the archive defines is taken for a method (and not listed) unless an
  operator of that name is denied outright; ``(self).X`` within a class that defines ``X`` always is.
- ``__torch__.A.B`` names the archive's own classes and functions, except ``__torch__.torch.classes``:
  C++ custom classes, whose methods and ``__setstate__`` are native code.
- Free names are locals, the compiler's builtins (``len``, ``range``, ``getattr`` …), the importer's
  special forms (``annotate``, ``fork`` …) or constants; a call to any other free name is a problem.

Code torch never writes is refused rather than interpreted: control characters (tabs, ``\\r``) and
comments (TorchScript compiles ``# type:`` comments). The pickles (``data.pkl``, ``constants.pkl``)
are scanned for ``torch.classes`` objects. Standard ``torch.nn`` modules script without any of this.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import tokenize
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from registry import operators, pickles
from registry.errors import FormatError, one_line

#: Largest code or pickle member read into memory; ordinary models have code of a few hundred kB.
MAX_MEMBER_BYTES = 64 * 1024 * 1024

#: Free names the TorchScript compiler and source importer resolve to builtins, with their operator.
BUILTINS: dict[str, str] = {
    "print": "prim::Print", "tuple": "prim::TupleConstruct", "float": "aten::Float", "complex": "aten::Complex",
    "int": "aten::Int", "bool": "aten::Bool", "str": "aten::str", "getattr": "prim::GetAttr",
    "hasattr": "prim::HasAttr", "isinstance": "prim::isinstance", "_to_tensor": "prim::NumToTensor",
    "len": "aten::len", "hex": "aten::hex", "oct": "aten::oct", "round": "aten::round", "hash": "aten::hash",
    "id": "prim::id", "min": "prim::min", "max": "prim::max", "abs": "prim::abs", "all": "aten::all",
    "any": "aten::any", "divmod": "aten::divmod", "sum": "aten::sum", "list": "prim::list", "dict": "prim::dict",
    "ord": "aten::ord", "chr": "aten::chr", "bin": "aten::bin", "pow": "aten::pow", "range": "prim::range",
    "zip": "prim::zip", "enumerate": "prim::enumerate", "rangelist": "prim::rangelist", "sorted": "aten::sorted",
    "AssertionError": "prim::RaiseException", "fork": "prim::fork", "awaitable": "prim::awaitable",
    "annotate": "prim::annotate", "unchecked_cast": "prim::unchecked_cast", "uninitialized": "prim::Uninitialized",
}
#: Other free names the importer resolves (constants, the archive's own namespace, type names).
_KNOWN_NAMES = frozenset({"torch", "ops", "CONSTANTS", "__torch__", "inf", "nan", "infj", "nanj", "self"})
# Class-body names torch writes that are not attributes of the class.
_CLASS_META = frozenset({"__parameters__", "__buffers__", "__annotations__"})
_STATE_METHODS = {
    "__setstate__": "torch.jit.load runs it while reading the archive",
    "__getstate__": "it customises how the object is serialised",
}
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ProgramReport:
    """What a TorchScript archive's code calls, and why it is not a data-only program (if it is not)."""

    ops: tuple[str, ...]  # sorted unique operators referenced, "aten::linear", "prim::Print", "quantized::add"
    problems: tuple[str, ...]  # one line each; empty for a data-only program

    @property
    def data_only(self) -> bool:
        return not self.problems


def vet_torchscript(source: str | os.PathLike[str] | BinaryIO, label: str) -> ProgramReport:
    """Read a TorchScript archive's code and pickles (never its tensors) and report what it would run.

    Args:
        source: the archive, as a path or an open, seekable binary file (read from wherever zipfile
            seeks; not closed).
        label: how problems and errors name it.

    Returns:
        The operators the code references and the problems that keep it from being data-only.

    Raises:
        FormatError: ``source`` is not a readable zip archive.
    """
    try:
        with zipfile.ZipFile(source) as zf:
            return _vet_archive(zf, label)
    except FormatError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError,
            RuntimeError, zlib.error) as e:
        raise FormatError(f"{label} is not a readable TorchScript archive ({one_line(e)})") from e


def export_operators(source: str | os.PathLike[str] | BinaryIO, label: str = "the program") -> tuple[str, ...]:
    """The operators a ``.pt2``'s programs call, sorted: ``aten::linear.default``, ``_operator.getitem`` ….

    Node targets and operator-valued arguments (``as_operator``) of every ``models/*.json``, with
    ``torch.ops.NS.OP.OVERLOAD`` written ``NS::OP.OVERLOAD`` and other targets as stored. Vet the archive
    with :func:`registry.pt2.vet` first; this only lists.

    Raises:
        FormatError: ``source`` is not a readable zip archive or a program is not JSON.
    """
    found: set[str] = set()
    try:
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                parts = info.filename.lower().split("/")
                if len(parts) == 3 and parts[1] == "models" and parts[2].endswith(".json"):
                    problems: list[str] = []
                    data = _read(zf, info, problems)
                    if data is None:
                        raise FormatError(f"{label}: {problems[0]}")
                    found.update(_targets(json.loads(data)))
    except FormatError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError,
            RuntimeError, RecursionError, zlib.error) as e:
        raise FormatError(f"{label} is not a readable .pt2 archive ({one_line(e)})") from e
    return tuple(sorted(operators.from_export_target(t) or t for t in found))


def _targets(program: object) -> Iterator[str]:
    stack = [program]  # iterative: a crafted program could nest deeper than the recursion limit
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            target = value.get("target")
            if isinstance(target, str) and "inputs" in value:
                yield target
            if isinstance(value.get("as_operator"), str):
                yield value["as_operator"]
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _vet_archive(zf: zipfile.ZipFile, label: str) -> ProgramReport:
    infos = [i for i in zf.infolist() if not i.is_dir()]
    # torch finds members case-insensitively (miniz), so every ".py" anywhere counts as code.
    code = [i for i in infos if i.filename.lower().endswith(".py")]
    problems: list[str] = []
    if any(i.filename.lower().rsplit("/", 1)[-1] == "model.json" for i in infos):
        problems.append("it has the legacy TorchScript layout (model.json); re-save it with a current torch")
    if not code:
        problems.append("it holds no TorchScript code (code/**/*.py)")
    modules: list[tuple[str, ast.Module]] = []
    for info in code:
        tree = _parse(zf, info, problems)
        if tree is not None:
            modules.append((info.filename, tree))
    archive = _Archive.collect(tree for _, tree in modules)
    ops: dict[str, str] = {}  # operator -> where the code first references it
    for name, tree in modules:
        try:
            _Reader(name, archive, ops, problems).visit(tree)
        except RecursionError:
            problems.append(f"code member {name!r} nests too deeply to be read")
    for info in infos:
        # data.pkl and constants.pkl; *.debug_pkl hold source ranges, read without a class resolver.
        if info.filename.lower().endswith(".pkl"):
            _check_pickle(zf, info, problems)
    for op, where in sorted(ops.items()):
        reason = operators.effectful(op)
        if reason:
            problems.append(f"{where}: calls {op}, which {reason}")
    return ProgramReport(ops=tuple(sorted(ops)), problems=tuple(dict.fromkeys(problems)))


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, problems: list[str]) -> bytes | None:
    if info.file_size > MAX_MEMBER_BYTES:
        problems.append(f"member {info.filename!r} is larger than {MAX_MEMBER_BYTES} bytes")
        return None
    with zf.open(info) as f:
        data = f.read(MAX_MEMBER_BYTES + 1)  # the header's size may lie
    if len(data) > MAX_MEMBER_BYTES:
        problems.append(f"member {info.filename!r} is larger than {MAX_MEMBER_BYTES} bytes")
        return None
    return data


def _parse(zf: zipfile.ZipFile, info: zipfile.ZipInfo, problems: list[str]) -> ast.Module | None:
    data = _read(zf, info, problems)
    if data is None:
        return None
    where = f"code member {info.filename!r}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{where} is not UTF-8")
        return None
    if _CONTROL.search(text):
        problems.append(f"{where} contains control characters (tabs, carriage returns), which torch does not write")
        return None
    try:
        if any(t.type == tokenize.COMMENT for t in tokenize.generate_tokens(io.StringIO(text).readline)):
            problems.append(f"{where} contains comments, which torch does not write (it compiles '# type:' ones)")
            return None
        return ast.parse(text, filename=info.filename)
    except (SyntaxError, tokenize.TokenError, ValueError, RecursionError, MemoryError) as e:
        problems.append(f"{where} does not parse ({one_line(e, 120)})")
        return None


def _check_pickle(zf: zipfile.ZipFile, info: zipfile.ZipInfo, problems: list[str]) -> None:
    data = _read(zf, info, problems)
    if data is None:
        return
    try:
        globals_ = pickles.scan_pickle(data)
    except FormatError as e:
        problems.append(f"pickle {info.filename!r} cannot be scanned ({one_line(e, 120)})")
        return
    for module, name in sorted(globals_):
        dotted = f"{module}.{name}"
        if _is_custom_class(dotted.split(".")):
            problems.append(f"pickle {info.filename!r} holds a {dotted} object (a C++ custom class; its "
                            "__setstate__ is native code torch.jit.load runs)")


def _is_custom_class(parts: list[str]) -> bool:
    return parts[:3] == ["__torch__", "torch", "classes"]


@dataclass
class _Archive:
    """Names the archive's code defines: methods and attributes per class, and over all classes."""

    members: dict[str, set[str]] = field(default_factory=dict)  # class name -> its defs and attributes
    defined: set[str] = field(default_factory=set)

    @classmethod
    def collect(cls, trees: Iterable[ast.Module]) -> _Archive:
        archive = cls()
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    names = archive.members.setdefault(node.name, set())
                    for stmt in node.body:
                        names.update(_class_member_names(stmt))
                    archive.defined.update(names)
        return archive


def _class_member_names(stmt: ast.stmt) -> Iterator[str]:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
        yield stmt.name
    elif isinstance(stmt, ast.AnnAssign | ast.Assign):
        targets = [stmt.target] if isinstance(stmt, ast.AnnAssign) else stmt.targets
        for target in targets:
            if isinstance(target, ast.Name) and target.id not in _CLASS_META:
                yield target.id
            elif isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                yield str(target.slice.value)  # __annotations__["0"] = ...: an attribute named "0"


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None if the chain does not start at a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


class _Reader(ast.NodeVisitor):
    """Collects the operators one code member references and the problems it has."""

    def __init__(self, member: str, archive: _Archive, ops: dict[str, str], problems: list[str]) -> None:
        self.member, self.archive, self.ops, self.problems = member, archive, ops, problems
        self.classes: list[str] = []  # enclosing class names
        self.locals: list[set[str]] = []  # names bound in each enclosing function
        self.scopes: list[str] = []  # "class", "method" (first parameter self) or "function", innermost last

    def where(self, node: ast.AST) -> str:
        return f"{self.member} line {getattr(node, 'lineno', '?')}"

    def problem(self, node: ast.AST, text: str) -> None:
        self.problems.append(f"{self.where(node)}: {text}")

    def op(self, op: str, node: ast.AST) -> None:
        self.ops.setdefault(op, self.where(node))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.classes.append(node.name)
        self.scopes.append("class")
        self.generic_visit(node)
        self.scopes.pop()
        self.classes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name in _STATE_METHODS and self.classes:
            self.problem(node, f"class {self.classes[-1]} defines {node.name} ({_STATE_METHODS[node.name]})")
        elif node.name in _STATE_METHODS:
            self.problem(node, f"a function is named {node.name}")
        method = self.scopes[-1:] == ["class"] and [a.arg for a in node.args.args[:1]] == ["self"]
        self.scopes.append("method" if method else "function")
        self.locals.append(_bound_names(node))
        self.generic_visit(node)
        self.locals.pop()
        self.scopes.pop()

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.problem(node, "async def is not TorchScript")

    def visit_Import(self, node: ast.Import) -> None:
        self.problem(node, "an import statement, which torch does not write")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.problem(node, "an import statement, which torch does not write")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts = _dotted(node)
        if parts is None:  # a chain on a computed value: (x).save, (self.sub).forward
            self._member(node.value, node.attr, node, called=False)
            self.visit(node.value)
        else:
            self._chain(parts, node, called=False)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._chain([node.id], node, called=False)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name):
            self._free_call(func.id, node)
        elif isinstance(func, ast.Attribute) and (parts := _dotted(func)) is not None:
            self._chain(parts, node, called=True)
        elif isinstance(func, ast.Attribute):
            self._member(func.value, func.attr, node, called=True)
            self.visit(func.value)
        else:
            self.visit(func)
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr"):
            self._getattr(node)
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            self.visit(arg)

    def _chain(self, parts: list[str], node: ast.expr, *, called: bool) -> None:
        """A dotted name ``root.a.b`` (``root`` a bare name)."""
        root, rest = parts[0], parts[1:]
        if root == "torch" and not self._is_local(root):
            while rest and rest[0] == "autograd":  # torch.autograd is torch again (BuiltinModule)
                rest = rest[1:]
            if not rest:
                self.problem(node, "the torch operator namespace is used as a value")
            else:
                self.op(f"aten::{rest[0]}", node)
        elif root == "ops" and not self._is_local(root):
            if len(rest) < 2:
                self.problem(node, "an operator namespace is used as a value")
            else:
                self.op(f"{rest[0]}::{rest[1]}", node)
        elif root == "__torch__":
            if _is_custom_class(parts):
                self.problem(node, f"uses {'.'.join(parts[:5])}, a C++ custom class")
        else:
            # v.a.b: attribute reads on a local (self.linear.weight); the last one may be a method call.
            attribute = node.func if isinstance(node, ast.Call) else node
            while isinstance(attribute, ast.Attribute):
                self._member(attribute.value, attribute.attr, node, called=called)
                attribute, called = attribute.value, False

    def _member(self, receiver: ast.expr, name: str, node: ast.expr, *, called: bool) -> None:
        """``(receiver).name``: an attribute or method of an archive class, or a builtin method."""
        op = f"aten::{name}"
        # self is the instance only as a method's first parameter (TorchScript cannot rebind it to another type).
        in_own_class = (isinstance(receiver, ast.Name) and receiver.id == "self" and self.scopes[-1:] == ["method"]
                        and name in self.archive.members.get(self.classes[-1], ()))
        if in_own_class:
            return
        if name in self.archive.defined and op not in operators.DENIED_OPS:
            return
        if called:
            self.op(op, node)
        elif op in operators.DENIED_OPS:
            self.problem(node, f"reads attribute {name!r}, which may be {op}, which {operators.DENIED_OPS[op]}")

    def _free_call(self, name: str, node: ast.Call) -> None:
        if self._is_local(name):
            return
        if name in BUILTINS:
            self.op(BUILTINS[name], node)
        elif name in ("torch", "ops"):
            self.problem(node, f"calls {name!r} itself")
        elif name not in _KNOWN_NAMES:
            self.problem(node, f"calls {name!r}, which is neither a TorchScript builtin nor defined in the code")

    def _getattr(self, node: ast.Call) -> None:
        # getattr(v, "name") is v.name to the compiler, which needs the name to be a constant.
        if len(node.args) < 2 or not isinstance(node.args[1], ast.Constant) or not isinstance(node.args[1].value, str):
            self.problem(node, "getattr/hasattr with a name that is not a constant string")
            return
        name, receiver = node.args[1].value, node.args[0]
        if isinstance(receiver, ast.Name) and receiver.id in ("torch", "ops") and not self._is_local(receiver.id):
            self.problem(node, f"getattr on {receiver.id!r}")
        elif name.isidentifier():  # the result may be called, so it counts as a method ("0" is a submodule)
            self._member(receiver, name, node, called=True)

    def _is_local(self, name: str) -> bool:
        return any(name in scope for scope in self.locals)


def _bound_names(fn: ast.FunctionDef) -> set[str]:
    args = fn.args
    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    names.update(a.arg for a in (args.vararg, args.kwarg) if a is not None)
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node is not fn:
            names.add(node.name)
    return names
