"""Which operators a stored program may call: one allow-list for TorchScript code and torch.export graphs.

A TorchScript archive and a ``.pt2`` program both name the operators they call (``torch.from_file(...)``
in TorchScript source is ``aten::from_file``; a ``.pt2`` node targets ``torch.ops.aten.from_file.default``).
Both are vetted here, against torch 2.13's operator registry (``torch._C._jit_get_all_schemas()``):

- Only the ``aten`` and ``prim`` namespaces are allowed (plus ``higher_order.cond``/``while_loop`` in a
  ``.pt2``: control flow over subgraphs that are vetted in turn). Every other namespace is refused, with
  the reason in :data:`DENIED_NAMESPACES` where one is known: collectives (``c10d``, ``_c10d_functional``,
  ``symm_mem``), the profiler, quantized and backend kernels with C++ packed-parameter classes
  (``quantized``, ``mkldnn``, ``onednn``), compiler and test internals, and any namespace a C++
  extension registers (``torch.ops.myns``), whose code nobody here has read.
- Within ``aten`` and ``prim``, an operator is refused when it reaches outside the process:
  ``aten::from_file`` (maps a file; ``shared=True`` writes to it), ``aten::save`` (writes a file),
  ``prim::rpc_*`` (network), ``prim::profile*``, ``prim::PythonOp`` and graph-executor internals
  (``prim::FusionGroup``, ``prim::Guard`` …); and, so that an operator added by a later torch is
  refused until someone reads it, any whose name holds a word such as ``file``, ``save``, ``load``,
  ``path``, ``open``, ``write``, ``socket``, ``rpc``, ``c10d``, ``profile`` or ``library``.
  ``tests/test_programs.py`` checks that every schema taking a path-like ``str`` argument is refused.
- Allowed although they touch global state, because none of it outlives the process or leaves it:
  printing and warnings (``prim::Print``, ``aten::warn``: stdout/stderr, not files), RNG seeding
  (``aten::manual_seed``), grad mode (``aten::set_grad_enabled``, which ``torch.no_grad()`` compiles
  to), futures (``prim::fork``, ``aten::wait``) and CUDA caches.

This module does not import torch.
"""

from __future__ import annotations

import re

#: Namespaces whose operators may be called, minus :data:`DENIED_OPS` and the words below.
ALLOWED_NAMESPACES = frozenset({"aten", "prim"})

#: Higher-order operators a ``.pt2`` may call: pure control flow over subgraphs the same walk vets.
ALLOWED_HIGHER_ORDER = frozenset({"cond", "while_loop"})

#: Why each known namespace is refused; any other namespace is refused as unknown.
DENIED_NAMESPACES: dict[str, str] = {
    **dict.fromkeys(("c10d", "_c10d_functional", "_c10d_functional_autograd", "symm_mem", "_dtensor"),
                    "collective communication with other processes"),
    "profiler": "profiler hooks that record and write traces",
    **dict.fromkeys(("quantized", "_quantized", "quantization", "onednn", "mkldnn", "mkldnn_prepacked", "mkl",
                     "sparse"), "backend kernels with C++ packed-parameter objects, not needed by float models"),
    **dict.fromkeys(("prims", "inductor", "inductor_prims", "rngprims", "debugprims", "static_runtime", "onnx",
                     "export", "_native", "_test", "debug_mode_ops", "_TorchScriptTesting"),
                    "compiler or test internals, not written for ordinary models"),
    "higher_order": "a higher-order operator that calls other operators or kernels it is given",
}

#: Operators of the allowed namespaces that act outside the process, with the reason.
DENIED_OPS: dict[str, str] = {
    "aten::from_file": "maps a file into a tensor (with shared=True, writing the tensor writes the file)",
    "aten::save": "writes a file",
    "prim::rpc_async": "calls another process over the network",
    "prim::rpc_sync": "calls another process over the network",
    "prim::rpc_remote": "calls another process over the network",
    "prim::profile": "a profiling-executor hook",
    "prim::profile_ivalue": "a profiling-executor hook",
    "prim::PythonOp": "calls Python",
    "prim::IgnoredPythonOp": "stands for Python code",
    # Graph-executor internals: they read attributes (subgraphs, types) source code cannot give them.
    **{f"prim::{name}": "is a graph-executor internal, not an operator for programs to call" for name in (
        "AddStatValue BailOut BailoutTemplate DifferentiableGraph FallbackGraph FusionGroup Guard "
        "RequiresGradCheck StaticRuntimeCopyOuts StaticSubgraph TensorExprDynamicGroup TensorExprDynamicGuard "
        "TensorExprGroup TypeCheck oneDNNFusionGroup oneDNNFusionGuard"
    ).split()},
}

#: Words (``_``-separated, case-folded) that make an operator's name suspect of I/O until someone reads it.
DENIED_WORDS = frozenset("""
    file files filename fd path dir save saved load loads loaded dump open write read socket url http connect
    send recv rpc c10d profile profiler profiling library dlopen
    exec system spawn popen subprocess mmap shm env getenv setenv
""".split())

_ID = r"([A-Za-z_][A-Za-z0-9_]*)"
_OP = re.compile(rf"{_ID}::{_ID}(?:\.{_ID})?")
_EXPORT_TARGET = re.compile(rf"torch\.ops\.{_ID}\.{_ID}(?:\.{_ID})?")


def effectful(op: str) -> str | None:
    """Why ``op`` (``namespace::name[.overload]``) may not be called by a stored program, or None if it may.

    The reason completes "calls <op>, which ...":

    >>> effectful("aten::linear")
    >>> effectful("aten::from_file.default")
    'maps a file into a tensor (with shared=True, writing the tensor writes the file)'
    """
    match = _OP.fullmatch(op)
    if not match:
        return "is not an operator name"
    namespace, name, _ = match.groups()
    qualified = f"{namespace}::{name}"
    if namespace not in ALLOWED_NAMESPACES:
        why = DENIED_NAMESPACES.get(namespace, "not on the allow-list (only aten and prim are)")
        return f"is in namespace {namespace!r} ({why})"
    if qualified in DENIED_OPS:
        return DENIED_OPS[qualified]
    words = set(name.lower().strip("_").split("_"))
    suspect = sorted(words & DENIED_WORDS)
    if suspect:
        return f"may do I/O (its name contains {suspect[0]!r}) and is not on the allow-list"
    return None


def from_export_target(target: str) -> str | None:
    """``torch.ops.aten.from_file.default`` -> ``aten::from_file.default``; None for other target forms."""
    match = _EXPORT_TARGET.fullmatch(target)
    if not match:
        return None
    namespace, name, overload = match.groups()
    return f"{namespace}::{name}" + (f".{overload}" if overload else "")


def export_target_problem(target: str) -> str | None:
    """Why a ``.pt2`` node may not target ``torch.ops.<ns>.<op>[.<overload>]``; None if it may.

    Targets of other forms (``_operator.getitem``, ``torch.sym_max``) are not judged here.
    """
    op = from_export_target(target)
    if op is None:
        return None
    namespace, _, rest = op.partition("::")
    if namespace == "higher_order" and rest.partition(".")[0] in ALLOWED_HIGHER_ORDER:
        return None
    return effectful(op)
