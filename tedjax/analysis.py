"""Read the collectives and the memory use of a compiled, partitioned JAX program.

Usage::

    compiled = jax.jit(step).lower(*args).compile()
    for c in collectives(compiled, mesh):
        print(c.kind, c.axes, c.result_bytes)
    summarize(collectives(compiled, mesh))
    # {("all-to-all", ("expert",)): {"count": 2, "result_bytes": ..., "sent_bytes": ...}, ...}
    memory_report(compiled)  # {"argument_bytes": ..., "temp_bytes": ..., ...}
    print(report(compiled, mesh))  # markdown tables of both

Also the load-balance decisions a run logged (`balance_decisions`,
`plot_balance_decisions` over a run's metrics.jsonl).

What is read from the HLO text (``compiled.as_text()``, the program after SPMD
partitioning, i.e. per device):

* every all-to-all, ragged-all-to-all, all-reduce, all-gather, reduce-scatter
  and collective-permute, including the async ``*-start`` forms (the matching
  ``*-done`` is not counted) and collectives wrapped in ``async-start``
  computations. A combined op with tuple operands counts once, with the bytes
  of all its elements summed.
* the mesh axes each one runs over. The replica groups of an SPMD program are
  *partition ids*: positions in the compiled device assignment, which for a
  ``jax.jit`` over a ``Mesh`` is ``mesh.devices.flat`` (checked empirically:
  a mesh with a permuted device order still prints ``{{0,1},{2,3},...}`` for a
  psum over its innermost axis). When a compiled object is passed, its device
  assignment is read and mapped onto ``mesh``; for HLO text the identity is
  assumed. All formats XLA prints are parsed: explicit ``{{0,1},{2,3}}``,
  iota ``[4,2]<=[2,4]T(1,0)``, and the mesh-axes form this jax version emits
  for auto-partitioned code,
  ``mesh['axis_0'=2,'axis_1'=2,'axis_2'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_1'}``
  (sub-axes such as ``{'axis_0':(1)2}`` included).
* ``op_name`` metadata (to filter by ``jax.named_scope``), the HLO computation
  an op sits in, and whether that computation runs inside a ``while`` loop
  (``lax.scan``/``lax.map``/``fori_loop``), with the trip count when XLA
  knows it (``known_trip_count`` in the while's backend_config).

Bytes sent per device (ring/pairwise algorithms, P = group size, V = bytes of
the per-device result):
  all-to-all V(P-1)/P, all-reduce 2V(P-1)/P, all-gather V(P-1)/P,
  reduce-scatter V_in(P-1)/P = V(P-1) (V_in = P*V), collective-permute V.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = [
    "Collective",
    "collectives",
    "summarize",
    "memory_report",
    "report",
    "shape_bytes",
    "parse_replica_groups",
    "mesh_axis_groups",
    "match_axes",
    "internode_bytes",
]

KINDS = (
    "all-to-all",
    "ragged-all-to-all",
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
)
UNKNOWN_AXES = ("?",)


@dataclass(frozen=True)
class Collective:
    """One collective of a partitioned HLO program (numbers are per device).

    kind: "all-to-all", "all-reduce", "all-gather", "reduce-scatter",
        "collective-permute" or "ragged-all-to-all" (async forms are folded into
        their base kind).
    axes: the mesh axes the collective runs over, in mesh order, e.g.
        ("expert",) or ("data", "expert"); () for a trivial (size-1) group;
        ("?",) when the groups match no set of mesh axes.
    result_bytes: bytes of the result on one device (tuple elements summed).
    sent_bytes: bytes one device sends, from the formulas in the module doc.
    group_size: devices per replica group (for a collective-permute, the
        product of the sizes of `axes`).
    shape: the HLO result shape text (for async starts, the done's shape).
    op_name: the `metadata={op_name=...}` of the op, "" when absent.
    computation: the HLO computation the op sits in.
    in_loop: the computation runs inside a while loop body.
    trivial: every group has one device (no data moves).
    trip_count: times the enclosing while loops run (product over nesting),
        None when not in a loop or when XLA does not know it.
    name: the HLO instruction name.
    groups: the replica groups (positions in mesh.devices.flat), () when
        unknown; for a collective-permute its (source, target) pairs.
    """

    kind: str
    axes: tuple[str, ...]
    result_bytes: int
    sent_bytes: float
    group_size: int
    shape: str
    op_name: str
    computation: str
    in_loop: bool
    trivial: bool = False
    trip_count: int | None = None
    name: str = ""
    groups: tuple[tuple[int, ...], ...] = ()


# --------------------------------------------------------------------------- #
# shapes


# Bits per element of each HLO primitive type.
_DTYPE_BITS = {
    "pred": 8,
    "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8,
    "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64,
    "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128,
    "tf32": 32,
    "f4e2m1fn": 4, "f8e8m0fnu": 8, "f8e3m4": 8, "f8e4m3": 8, "f8e4m3fn": 8,
    "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8, "f8e5m2": 8, "f8e5m2fnuz": 8,
    "token": 0, "opaque": 0,
}  # fmt: skip

_ARRAY_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape text, tuple elements summed.

    "f32[16,8]{1,0}" -> 512; "(f32[4,4]{1,0}, bf16[3]{0})" -> 70; "f32[]" -> 4.
    Layouts, tilings and dynamic-dimension markers ("<=8") are ignored.
    """
    total = 0
    for dtype, dims in _ARRAY_SHAPE.findall(_strip_layouts(shape)):
        bits = _DTYPE_BITS.get(dtype)
        if bits is None:  # a type newer than this table: f8e..., s2, ... carry their width
            wm = re.match(r"[a-z]+(\d+)", dtype)
            if not wm:
                raise ValueError(f"unknown HLO element type {dtype!r} in shape {shape!r}")
            bits = int(wm.group(1))
        n = 1
        for d in dims.split(","):
            d = d.strip().lstrip("<=").strip()
            if d:
                n *= int(d)
        total += -(-n * bits // 8)
    return total


def _strip_layouts(shape: str) -> str:
    # Drop {layout} blocks (they may contain T(8,128) tilings or S(1) spaces).
    out, depth = [], 0
    for ch in shape:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _split_top_level(text: str) -> list[str]:
    """Split "a, (b, c), d" at top-level commas."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _tuple_elements(shape: str) -> list[str]:
    shape = shape.strip()
    if shape.startswith("(") and shape.endswith(")"):
        return _split_top_level(shape[1:-1])
    return [shape]


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes text[start] (quoted strings skipped)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack: list[str] = []
    i = start
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


# --------------------------------------------------------------------------- #
# replica groups


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", text)]


def _iota(reshape_dims: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    arr = np.arange(math.prod(reshape_dims)).reshape(tuple(reshape_dims))
    if perm:
        arr = arr.transpose(tuple(perm))
    return arr.reshape(-1)


def _parse_device_ids(text: str, n: int) -> np.ndarray:
    """The `device_ids=(...)` of a mesh-axes replica group list, flattened."""
    text = text.strip()
    m = re.fullmatch(r"\[([\d,\s]+)\]\s*(?:T\(([\d,\s]+)\))?", text)
    if m:  # iota: [reshape_dims]T(perm)
        ids = _iota(_ints(m.group(1)), _ints(m.group(2)) if m.group(2) else None)
    else:
        m = re.fullmatch(r"\[([\d,\s]+)\](.+)", text, flags=re.S)
        ids = np.array(_ints(m.group(2) if m else text))
    if ids.size != n:
        raise ValueError(f"device_ids {text!r} has {ids.size} ids for a mesh of {n}")
    return ids


def _parse_mesh_axes_groups(text: str) -> list[list[int]]:
    """Groups of `mesh['a'=2,'b'=4], device_ids=(...) {'b'}` (XLA MeshAxesReplicaGroupList)."""
    m = re.match(r"\s*maximal_mesh\[device_id=(\d+)\]", text)
    if m:
        return [[int(m.group(1))]]
    m = re.match(r"\s*mesh\[([^\]]*)\]", text)
    if not m:
        raise ValueError(f"not a mesh replica group list: {text[:120]!r}")
    names, sizes = [], []
    for item in _split_top_level(m.group(1)):
        name, _, size = item.rpartition("=")
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    rest = text[m.end():]
    n = math.prod(sizes)
    ids = np.arange(n)
    m2 = re.match(r"\s*,\s*device_ids=\(", rest)
    if m2:
        open_at = m2.end() - 1
        close_at = _matching(rest, open_at)
        ids = _parse_device_ids(rest[open_at + 1 : close_at - 1], n)
        rest = rest[close_at:]
    m3 = re.match(r"\s*\{", rest)
    if not m3:
        raise ValueError(f"mesh replica group list without axes: {text[:160]!r}")
    axes_text = rest[m3.end() - 1 : _matching(rest, m3.end() - 1)][1:-1]
    refs = []  # (mesh dim, pre_size or None, size or None)
    for item in _split_top_level(axes_text):
        sm = re.fullmatch(r"""['"]?(.*?)['"]?\s*(?::\((\d+)\)(\d+))?""", item.strip())
        name = sm.group(1)
        dim = names.index(name) if name in names else int(name)
        refs.append((dim, int(sm.group(2)), int(sm.group(3))) if sm.group(2) else (dim, None, None))
    if not refs:
        return [[int(i)] for i in ids]
    # Split each referenced mesh dim into sub-dims (XLA's ComputeReindexedAxes),
    # then move the grouped sub-dims to the end in the order listed and chunk.
    by_dim: dict[int, list[int]] = {}
    for k, (dim, _, _) in enumerate(refs):
        by_dim.setdefault(dim, []).append(k)
    new_sizes: list[int] = []
    grouped_pos: dict[int, int] = {}  # ref index -> position in new_sizes
    for dim, size in enumerate(sizes):
        ks = by_dim.get(dim)
        if not ks:
            new_sizes.append(size)
            continue
        if len(ks) == 1 and refs[ks[0]][1] is None:
            grouped_pos[ks[0]] = len(new_sizes)
            new_sizes.append(size)
            continue
        prefix = 1
        for k in sorted(ks, key=lambda k: refs[k][1] or 1):
            pre, sub = refs[k][1] or 1, refs[k][2] or size
            if pre != prefix:
                new_sizes.append(pre // prefix)
                prefix = pre
            grouped_pos[k] = len(new_sizes)
            new_sizes.append(sub)
            prefix *= sub
        if prefix != size:
            new_sizes.append(size // prefix)
    grouped = [grouped_pos[k] for k in range(len(refs))]
    order = [i for i in range(len(new_sizes)) if i not in grouped] + grouped
    group_size = math.prod(new_sizes[i] for i in grouped)
    arr = ids.reshape(new_sizes).transpose(order).reshape(-1, group_size)
    return arr.tolist()


def parse_replica_groups(text: str) -> list[list[int]] | None:
    """Replica groups from the text right after `replica_groups=`.

    Handles `{{0,1},{2,3}}`, `{}` (returned as [] = one group of everyone),
    iota `[2,4]<=[8]` / `[4,2]<=[2,4]T(1,0)`, and the mesh-axes form
    `mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}`.
    The text may run on past the groups (the rest of the HLO line).
    """
    text = text.lstrip()
    if text.startswith("{"):
        body = text[: _matching(text, 0)]
        inner = body[1:-1].strip()
        if not inner:
            return []
        return [_ints(g) for g in re.findall(r"\{([^{}]*)\}", inner)]
    if text.startswith("["):
        m = re.match(r"\[([\d,\s]+)\]<=\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?", text)
        if not m:
            raise ValueError(f"cannot parse iota replica groups {text[:120]!r}")
        shape = _ints(m.group(1))
        ids = _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
        return ids.reshape(shape[0], -1).tolist() if len(shape) > 1 else [ids.tolist()]
    if text.startswith(("mesh[", "maximal_mesh[")):
        return _parse_mesh_axes_groups(text)
    return None


# --------------------------------------------------------------------------- #
# mesh matching


def _mesh_shape(mesh: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    names = tuple(mesh.axis_names)
    shape = mesh.shape  # {name: size} for Mesh and AbstractMesh
    return names, tuple(int(shape[n]) for n in names)


def mesh_axis_groups(mesh: Any) -> dict[tuple[str, ...], frozenset[frozenset[int]]]:
    """For every subset of mesh axes, the partition of positions into groups.

    Positions are indices into `mesh.devices.flat` (= the partition ids of a
    program compiled for this mesh). The subset () gives singleton groups.
    """
    names, sizes = _mesh_shape(mesh)
    pos = np.arange(math.prod(sizes)).reshape(sizes)
    out = {}
    for r in range(len(names) + 1):
        for subset in itertools.combinations(range(len(names)), r):
            rest = [i for i in range(len(names)) if i not in subset]
            g = math.prod(sizes[i] for i in subset)
            arr = pos.transpose(rest + list(subset)).reshape(-1, g)
            out[tuple(names[i] for i in subset)] = frozenset(frozenset(row) for row in arr.tolist())
    return out


def match_axes(groups: Iterable[Iterable[int]], mesh: Any) -> tuple[str, ...]:
    """The smallest set of mesh axes (in mesh order) whose groups equal `groups`.

    `groups` hold positions in `mesh.devices.flat`. Returns ("?",) if none match.
    """
    target = frozenset(frozenset(int(i) for i in g) for g in groups)
    for axes, partition in mesh_axis_groups(mesh).items():  # ordered by size
        if partition == target:
            return axes
    return UNKNOWN_AXES


def _permute_axes(pairs: Sequence[tuple[int, int]], mesh: Any) -> tuple[str, ...]:
    names, sizes = _mesh_shape(mesh)
    n = math.prod(sizes)
    differ = set()
    for s, t in pairs:
        if not (0 <= s < n and 0 <= t < n):
            return UNKNOWN_AXES
        cs, ct = np.unravel_index(s, sizes), np.unravel_index(t, sizes)
        differ.update(i for i in range(len(names)) if cs[i] != ct[i])
    return tuple(names[i] for i in sorted(differ))


# --------------------------------------------------------------------------- #
# HLO text


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*[({]")
_CALLEE_ONE = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_CALLEE_LIST = re.compile(r"\b(calls|branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')


@dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: str
    attrs: str
    computation: str


def _parse_instruction(line: str, computation: str) -> _Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        sp = re.search(r"\s", rest)
        if not sp:
            return None
        end = sp.start()
    shape, rest = rest[:end], rest[end:].lstrip()
    om = re.match(r"([a-z][\w\-]*)\(", rest)
    if not om:
        return None
    close = _matching(rest, om.end() - 1)
    return _Instr(
        name=m.group(1),
        shape=shape,
        opcode=om.group(1),
        operands=rest[om.end() : close - 1],
        attrs=rest[close:],
        computation=computation,
    )


def _parse_module(text: str) -> tuple[dict[str, list[_Instr]], str | None]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        if not line[0].isspace():
            stripped = line.rstrip()
            if stripped == "}":
                current = None
                continue
            hm = _COMP_HEADER.match(stripped)
            if hm and stripped.endswith("{") and not stripped.startswith("HloModule"):
                current = hm.group(2)
                comps.setdefault(current, [])
                if hm.group(1):
                    entry = current
                continue
            if stripped.startswith("HloModule"):
                continue
        instr = _parse_instruction(line, current or "")
        if instr is not None:
            comps.setdefault(current or "", []).append(instr)
    return comps, entry


def ancestors_in_entry(compiled_or_hlo_text: Any, kind: str) -> dict[str, set[str]]:
    """For every `kind` op (e.g. "all-to-all") of the ENTRY computation, the other `kind` ops it
    depends on, through data edges of that computation (fusions count as one node).

    Shows which collectives can overlap: two that do not depend on each other may run at
    the same time as the compute between them.
    """
    comps, entry = _parse_module(_hlo_text(compiled_or_hlo_text))
    instrs = comps.get(entry, [])
    parents = {i.name: re.findall(r"%([\w.\-]+)", i.operands) for i in instrs}
    targets = [i.name for i in instrs if i.opcode == kind or i.opcode == f"{kind}-start"]
    out = {}
    for name in targets:
        seen, stack = set(), list(parents.get(name, []))
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(parents.get(node, []))
        out[name] = {t for t in targets if t in seen}
    return out


def _callees(instr: _Instr) -> list[str]:
    out = [m.group(2) for m in _CALLEE_ONE.finditer(instr.attrs)]
    for m in _CALLEE_LIST.finditer(instr.attrs):
        out += [c.strip().lstrip("%") for c in m.group(2).split(",") if c.strip()]
    return out


def _loop_context(
    comps: dict[str, list[_Instr]], entry: str | None
) -> dict[str, tuple[bool, int | None]]:
    """computation -> (inside a while loop, product of known trip counts or None)."""
    ctx: dict[str, tuple[bool, int | None]] = {}
    if entry is None:
        return ctx
    stack = [(entry, False, 1)]
    while stack:
        comp, in_loop, trips = stack.pop()
        if comp in ctx:
            continue
        ctx[comp] = (in_loop, trips if in_loop else None)
        for instr in comps.get(comp, []):
            callees = _callees(instr)
            if instr.opcode == "while":
                tm = _TRIP.search(instr.attrs)
                n = int(tm.group(1)) if tm else None
                body_trips = trips * n if (trips is not None and n is not None) else None
                loop_parts = {
                    m.group(2)
                    for m in _CALLEE_ONE.finditer(instr.attrs)
                    if m.group(1) in ("body", "condition")
                }
                for c in callees:
                    if c in loop_parts:
                        stack.append((c, True, body_trips))
                    else:
                        stack.append((c, in_loop, trips))
            else:
                for c in callees:
                    stack.append((c, in_loop, trips))
    return ctx


def _kind_of(opcode: str) -> tuple[str, bool] | None:
    """(base kind, is async start) or None if not a counted collective."""
    if opcode in KINDS:
        return opcode, False
    if opcode.endswith("-start") and opcode[: -len("-start")] in KINDS:
        return opcode[: -len("-start")], True
    return None


def _hlo_text(compiled_or_hlo_text: Any) -> str:
    if isinstance(compiled_or_hlo_text, str):
        return compiled_or_hlo_text
    if hasattr(compiled_or_hlo_text, "as_text"):
        text = compiled_or_hlo_text.as_text()
        if text is None:
            raise ValueError("the compiled object has no HLO text")
        if "HloModule" not in text and ("func.func" in text or "module @" in text):
            raise ValueError(
                "got StableHLO (a jax Lowered?); pass the compiled program, "
                "jax.jit(f).lower(*args).compile(), whose HLO is partitioned per device"
            )
        return text
    raise TypeError(
        "collectives() takes a jax compiled object (jax.jit(f).lower(...).compile()) "
        f"or its HLO text, got {type(compiled_or_hlo_text).__name__}"
    )


def _partition_to_position(compiled: Any, mesh: Any) -> dict[int, int] | None:
    """Partition id -> index in mesh.devices.flat, from a compiled device assignment."""
    if isinstance(compiled, str) or not hasattr(mesh, "devices"):
        return None
    try:
        assignment = [d.id for d in compiled.runtime_executable().local_devices()]
        mesh_ids = [d.id for d in np.asarray(mesh.devices).flat]
    except Exception:  # noqa: BLE001 - best effort; fall back to identity
        return None
    if len(assignment) != len(mesh_ids) or set(assignment) != set(mesh_ids):
        return None
    where = {d: i for i, d in enumerate(mesh_ids)}
    mapping = {p: where[d] for p, d in enumerate(assignment)}
    return None if all(p == q for p, q in mapping.items()) else mapping


def _sent_bytes(kind: str, v: int, p: int) -> float:
    if kind == "collective-permute":
        return float(v)
    if p <= 1:
        return 0.0
    if kind in ("all-to-all", "ragged-all-to-all", "all-gather"):
        return v * (p - 1) / p
    if kind == "all-reduce":
        return 2.0 * v * (p - 1) / p
    if kind == "reduce-scatter":
        return float(v * (p - 1))  # V_in (P-1)/P with V_in = P * V_out
    raise ValueError(kind)


def collectives(compiled_or_hlo_text: Any, mesh: Any) -> list[Collective]:
    """Every collective in a compiled program (or its HLO text), in text order.

    `mesh` is the jax.sharding.Mesh (or AbstractMesh) the program was compiled
    for. Trivial collectives (groups of one device) are returned with
    `trivial=True` and `axes=()`; `summarize` leaves them out by default.
    """
    text = _hlo_text(compiled_or_hlo_text)
    remap = _partition_to_position(compiled_or_hlo_text, mesh)
    comps, entry = _parse_module(text)
    loops = _loop_context(comps, entry)
    _, sizes = _mesh_shape(mesh)
    n_devices = math.prod(sizes)

    done_shape: dict[str, str] = {}
    for instrs in comps.values():
        for ins in instrs:
            if ins.opcode.endswith("-done"):
                names = re.findall(r"%([\w.\-]+)", ins.operands) or [ins.operands.strip()]
                done_shape[names[0]] = ins.shape

    out = []
    for comp, instrs in comps.items():
        for ins in instrs:
            kind_async = _kind_of(ins.opcode)
            if kind_async is None:
                continue
            kind, is_async = kind_async
            shape = ins.shape
            if is_async:
                if ins.name in done_shape:
                    shape = done_shape[ins.name]
                elif kind in ("all-gather", "collective-permute"):
                    elems = _tuple_elements(shape)  # (operands, results[, contexts])
                    shape = elems[1] if len(elems) >= 2 else shape
            result_bytes = shape_bytes(shape)

            if kind == "collective-permute":
                pm = re.search(r"source_target_pairs=\{", ins.attrs)
                if pm:
                    body = ins.attrs[pm.end() - 1 : _matching(ins.attrs, pm.end() - 1)]
                    pairs = [tuple(_ints(g))[:2] for g in re.findall(r"\{([^{}]*)\}", body[1:-1])]
                    if remap:
                        pairs = [(remap.get(s, s), remap.get(t, t)) for s, t in pairs]
                    pairs = [(s, t) for s, t in pairs if s != t]
                    members = tuple(pairs)
                    axes = _permute_axes(pairs, mesh) if pairs else ()
                    trivial = not pairs
                else:  # a form this parser does not know: say so, do not guess
                    axes, trivial, members = UNKNOWN_AXES, False, ()
                size_of = dict(zip(*_mesh_shape(mesh)))
                group_size = 0 if axes == UNKNOWN_AXES else math.prod(size_of[a] for a in axes)
            else:
                gm = re.search(r"replica_groups=", ins.attrs)
                try:
                    groups = parse_replica_groups(ins.attrs[gm.end():]) if gm else []
                except (ValueError, IndexError):
                    groups = None
                members = ()
                if groups is None:  # a form this parser does not know
                    axes, group_size, trivial = UNKNOWN_AXES, 0, False
                else:
                    if not groups:  # {} or absent: one group of every device
                        groups = [list(range(n_devices))]
                    if remap:
                        groups = [[remap.get(i, i) for i in g] for g in groups]
                    group_size = len(groups[0])
                    trivial = all(len(g) == 1 for g in groups)
                    axes = () if trivial else match_axes(groups, mesh)
                    members = tuple(tuple(g) for g in groups)
            sent = 0.0 if trivial else _sent_bytes(kind, result_bytes, max(group_size, 1))
            om = _OP_NAME.search(ins.attrs)
            in_loop, trips = loops.get(comp, (False, None))
            out.append(
                Collective(
                    kind=kind,
                    axes=tuple(axes),
                    result_bytes=result_bytes,
                    sent_bytes=sent,
                    group_size=group_size,
                    shape=shape,
                    op_name=om.group(1) if om else "",
                    computation=comp,
                    in_loop=in_loop,
                    trivial=trivial,
                    trip_count=trips,
                    name=ins.name,
                    groups=members,
                )
            )
    return out


def internode_bytes(c: Collective, node_size: int) -> float:
    """Bytes one device of `c` sends to other nodes, on average: its `sent_bytes` times the share of its
    peers (or, for a collective-permute, of its pairs) on another node. Nodes are blocks of `node_size`
    consecutive positions in mesh.devices.flat, as `tedjax.mesh.make_mesh` lays hosts out.

    Raises for a collective whose groups were not parsed (its crossing cannot be told).
    """
    if c.trivial or not c.sent_bytes:
        return 0.0
    if not c.groups or node_size < 1:
        raise ValueError(f"{c.kind} {c.name} has no parsed replica groups; its crossing of nodes is unknown")
    if c.kind == "collective-permute":
        return c.sent_bytes * sum(s // node_size != t // node_size for s, t in c.groups) / len(c.groups)
    shares = [sum(j // node_size != i // node_size for j in g) / (len(g) - 1) for g in c.groups if len(g) > 1
              for i in g]
    return c.sent_bytes * sum(shares) / len(shares)


_FIELDS = {f.name for f in fields(Collective)}


def summarize(
    collectives: Iterable[Collective],
    *,
    by: Sequence[str] = ("kind", "axes"),
    include_trivial: bool = False,
    weight_by_trip_count: bool = False,
    node_size: int = 0,
) -> dict[tuple, dict[str, float]]:
    """Counts and total bytes per group of collectives.

    Keys are tuples of the `by` fields, e.g. ("all-to-all", ("expert",)); values
    are {"count": ops, "result_bytes": sum, "sent_bytes": sum}. Trivial ops are
    left out unless `include_trivial`. With `weight_by_trip_count`, an op in a
    while loop of known trip count N counts N times (its bytes too); ops in
    loops of unknown trip count count once. With `node_size` > 0 each row also
    has "internode_bytes" (`internode_bytes`: what crosses nodes of that many devices).
    """
    by = tuple(by)
    unknown = [b for b in by if b not in _FIELDS]
    if unknown:
        raise ValueError(f"summarize(by=...) names unknown fields {unknown}; use {sorted(_FIELDS)}")
    out: dict[tuple, dict[str, float]] = {}
    for c in collectives:
        if c.trivial and not include_trivial:
            continue
        w = c.trip_count if (weight_by_trip_count and c.in_loop and c.trip_count) else 1
        key = tuple(getattr(c, b) for b in by)
        row = out.setdefault(key, {"count": 0, "result_bytes": 0, "sent_bytes": 0.0})
        row["count"] += w
        row["result_bytes"] += w * c.result_bytes
        row["sent_bytes"] += w * c.sent_bytes
        if node_size:
            row["internode_bytes"] = row.get("internode_bytes", 0.0) + w * internode_bytes(c, node_size)
    return out


# --------------------------------------------------------------------------- #
# memory


_MEMORY_FIELDS = (
    ("argument_bytes", "argument_size_in_bytes"),
    ("output_bytes", "output_size_in_bytes"),
    ("alias_bytes", "alias_size_in_bytes"),
    ("temp_bytes", "temp_size_in_bytes"),
    ("generated_code_bytes", "generated_code_size_in_bytes"),
    ("peak_bytes", "peak_memory_in_bytes"),
    ("host_argument_bytes", "host_argument_size_in_bytes"),
    ("host_output_bytes", "host_output_size_in_bytes"),
    ("host_alias_bytes", "host_alias_size_in_bytes"),
    ("host_temp_bytes", "host_temp_size_in_bytes"),
    ("host_generated_code_bytes", "host_generated_code_size_in_bytes"),
)


def memory_report(compiled: Any) -> dict[str, int]:
    """Per-device memory of a compiled program, from `compiled.memory_analysis()`.

    Keys (those the backend reports): argument_bytes, output_bytes, alias_bytes,
    temp_bytes, generated_code_bytes, peak_bytes, host_* counterparts, and
    total_bytes = argument + output - alias + temp (the live-buffer estimate).
    Returns {} when the backend gives no analysis.
    """
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    if isinstance(stats, (list, tuple)):  # some versions: one entry per program
        stats = stats[0] if stats else None
        if stats is None:
            return {}
    out = {}
    for key, attr in _MEMORY_FIELDS:
        value = getattr(stats, attr, None)
        if value is not None:
            out[key] = int(value)
    if all(k in out for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")):
        out["total_bytes"] = (
            out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
        )
    return out


# --------------------------------------------------------------------------- #
# report


def _fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def report(compiled: Any, mesh: Any) -> str:
    """Markdown tables: collectives per (kind, axes), each collective, memory."""
    colls = collectives(compiled, mesh)
    lines = ["### Collectives (per device)", ""]
    summary = summarize(colls)
    if summary:
        lines += [
            "| kind | axes | count | result bytes | sent bytes |",
            "|---|---|---:|---:|---:|",
        ]
        for (kind, axes), row in sorted(summary.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            lines.append(
                f"| {kind} | {','.join(axes) or '-'} | {row['count']} | "
                f"{_fmt_bytes(row['result_bytes'])} | {_fmt_bytes(row['sent_bytes'])} |"
            )
        lines += [
            "",
            "| # | kind | axes | shape | result bytes | loop | op_name |",
            "|---:|---|---|---|---:|---|---|",
        ]
        for i, c in enumerate(x for x in colls if not x.trivial):
            loop = "-" if not c.in_loop else f"x{c.trip_count if c.trip_count else '?'}"
            op = c.op_name.replace("|", "\\|")
            lines.append(
                f"| {i} | {c.kind} | {','.join(c.axes) or '-'} | `{c.shape}` | "
                f"{c.result_bytes} | {loop} | {op} |"
            )
    else:
        lines.append("(none)")
    n_trivial = sum(c.trivial for c in colls)
    if n_trivial:
        lines += ["", f"{n_trivial} trivial (size-1 group) collective(s) not shown."]
    mem = memory_report(compiled)
    lines += ["", "### Memory (per device)", ""]
    if mem:
        lines += ["| field | bytes | |", "|---|---:|---:|"]
        for key, value in mem.items():
            if key.startswith("host_") and value == 0:
                continue
            lines.append(f"| {key.removesuffix('_bytes')} | {value} | {_fmt_bytes(value)} |")
    else:
        lines.append("(no memory analysis from this backend)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- load-balance decisions of a run


def balance_decisions(metrics_path: Any) -> dict[str, list[dict]]:
    """The shadow and placement decision records of a run's `metrics.jsonl`, in step order:
    {"shadows": [...], "placement": [...]} (every decision, adopted or not; the fields are in the README)."""
    import json
    from pathlib import Path

    out: dict[str, list[dict]] = {"shadows": [], "placement": []}
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") in out:
            out[record["kind"]].append(record)
    return out


def plot_balance_decisions(metrics_path: Any, path: Any = None) -> Any:
    """Decisions over steps (needs matplotlib): each MoE layer's predicted layer time without and with its
    shadows (a filled marker where some were chosen), and its largest device load now and under the greedy
    placement (a filled marker where adopted). Returns the figure; saves it to `path` if given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decisions = balance_decisions(metrics_path)
    kinds = [k for k in ("shadows", "placement") if decisions[k]] or ["shadows"]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(7, 3 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        records = decisions[kind]
        steps = [r["step"] for r in records]
        if kind == "shadows":
            before, after = "predicted_latency_s", "predicted_latency_with_shadows_s"
            label = "predicted layer time (ms)"
            acted = [[n > 0 for n in r["num_shadows"]] for r in records]
        else:
            before, after, label = "old_max_device_load", "new_max_device_load", "largest device load"
            acted = [r["adopted"] for r in records]
        scale = 1e3 if kind == "shadows" else 1.0
        for layer in range(len(records[0]["layers"]) if records else 0):
            line, = ax.plot(steps, [r[before][layer] * scale for r in records], label=f"L{layer} now")
            ys = [r[after][layer] * scale for r in records]
            ax.plot(steps, ys, "--", color=line.get_color(),
                    label=f"L{layer} {'with shadows' if kind == 'shadows' else 'greedy'}")
            done = [(s, y) for s, y, a in zip(steps, ys, acted) if a[layer]]
            if done:
                ax.plot(*zip(*done), "o", color=line.get_color())
        ax.set_title(f"{kind} decisions ({'filled: chosen' if kind == 'shadows' else 'filled: adopted'})")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if records:
            ax.legend(fontsize="small")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig

