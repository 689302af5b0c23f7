"""tedjax.analysis: collectives and memory read from compiled, partitioned HLO.

Expected numbers are computed here from shapes and the mesh layout (devices
0..7 on a (data=2, expert=2, tensor=2) mesh, tensor innermost), never copied
from the parser's output.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tedjax.analysis import (
    Collective,
    collectives,
    match_axes,
    memory_report,
    parse_replica_groups,
    report,
    shape_bytes,
    summarize,
)
from tedjax.mesh import make_mesh

F32 = 4


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(2, 2, 2)


def _sds(shape, mesh, spec, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _nontrivial(cs, kind=None):
    return [c for c in cs if not c.trivial and (kind is None or c.kind == kind)]


# --------------------------------------------------------------------------- #
# compiled programs, shared


@pytest.fixture(scope="module")
def matmul_compiled(mesh):
    # x[16,32] split over "tensor" on the contraction dim -> partial sums -> all-reduce.
    def f(x, w):
        with jax.named_scope("moe"):
            y = x @ w
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P()))

    with jax.set_mesh(mesh):
        return jax.jit(f).lower(
            _sds((16, 32), mesh, P(None, "tensor")), _sds((32, 8), mesh, P("tensor", None))
        ).compile()


@pytest.fixture(scope="module")
def a2a_compiled(mesh):
    return jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P("data", "expert"))).lower(
        _sds((16, 32), mesh, P(("data", "expert"), None))
    ).compile()


@pytest.fixture(scope="module")
def allgather_compiled(mesh):
    return jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P())).lower(
        _sds((16, 32), mesh, P("data", None))
    ).compile()


@pytest.fixture(scope="module")
def reduce_scatter_compiled(mesh):
    f = jax.shard_map(
        lambda v: jax.lax.psum_scatter(v, "expert", scatter_dimension=0, tiled=True),
        mesh=mesh,
        in_specs=P(),
        out_specs=P("expert"),
        check_vma=False,
    )
    return jax.jit(f).lower(jnp.ones((8, 4), jnp.float32)).compile()


@pytest.fixture(scope="module")
def ppermute_compiled(mesh):
    f = jax.shard_map(
        lambda v: jax.lax.ppermute(v, "expert", [(0, 1), (1, 0)]),
        mesh=mesh,
        in_specs=P("expert"),
        out_specs=P("expert"),
    )
    return jax.jit(f).lower(_sds((16, 32), mesh, P("expert"))).compile()


@pytest.fixture(scope="module")
def scan_compiled(mesh):
    def body(c, _):
        c = jax.lax.with_sharding_constraint(c, NamedSharding(mesh, P("data")))
        c = c * 2
        c = jax.lax.with_sharding_constraint(c, NamedSharding(mesh, P(None, "data")))
        return c, None

    f = lambda x: jax.lax.scan(body, x, None, length=3)[0]  # noqa: E731
    return jax.jit(f).lower(_sds((16, 32), mesh, P("data"))).compile()


# --------------------------------------------------------------------------- #
# real compiled programs


def test_matmul_all_reduce_over_tensor(mesh, matmul_compiled):
    cs = _nontrivial(collectives(matmul_compiled, mesh))
    assert [c.kind for c in cs] == ["all-reduce"]
    (c,) = cs
    assert c.axes == ("tensor",)
    p = mesh.shape["tensor"]
    assert c.group_size == p
    expected = 16 * 8 * F32  # the replicated [16, 8] product on every device
    assert c.result_bytes == expected
    assert c.sent_bytes == pytest.approx(2 * expected * (p - 1) / p)
    assert c.shape.startswith("f32[16,8]")
    assert not c.in_loop and c.trip_count is None
    # named_scope shows in op_name, so callers can filter MoE collectives
    assert "moe" in c.op_name


def test_hlo_text_gives_same_result(mesh, matmul_compiled):
    assert collectives(matmul_compiled.as_text(), mesh) == collectives(matmul_compiled, mesh)


def test_reshard_all_to_all_over_expert(mesh, a2a_compiled):
    cs = _nontrivial(collectives(a2a_compiled, mesh))
    assert [c.kind for c in cs] == ["all-to-all"]
    (c,) = cs
    assert c.axes == ("expert",)
    p = mesh.shape["expert"]
    assert c.group_size == p
    # per device: [16/(data*expert), 32] in == [16/data, 32/expert] out
    d, e = mesh.shape["data"], mesh.shape["expert"]
    expected = (16 // d) * (32 // e) * F32
    assert expected == (16 // (d * e)) * 32 * F32
    assert c.result_bytes == expected
    assert c.sent_bytes == pytest.approx(expected * (p - 1) / p)


def test_all_gather_over_data(mesh, allgather_compiled):
    cs = _nontrivial(collectives(allgather_compiled, mesh))
    assert [c.kind for c in cs] == ["all-gather"]
    (c,) = cs
    assert c.axes == ("data",)
    p = mesh.shape["data"]
    assert c.group_size == p
    assert c.result_bytes == 16 * 32 * F32  # gathered to the full array
    assert c.sent_bytes == pytest.approx(16 * 32 * F32 * (p - 1) / p)


def test_reduce_scatter_over_expert(mesh, reduce_scatter_compiled):
    # CPU XLA keeps the reduce-scatter that shard_map's psum_scatter emits.
    cs = _nontrivial(collectives(reduce_scatter_compiled, mesh))
    assert [c.kind for c in cs] == ["reduce-scatter"]
    (c,) = cs
    p = mesh.shape["expert"]
    assert c.axes == ("expert",)
    assert c.group_size == p
    v_in = 8 * 4 * F32
    assert c.result_bytes == v_in // p
    assert c.sent_bytes == pytest.approx(v_in * (p - 1) / p)


def test_ppermute_collective_permute_over_expert(mesh, ppermute_compiled):
    cs = _nontrivial(collectives(ppermute_compiled, mesh))
    assert [c.kind for c in cs] == ["collective-permute"]
    (c,) = cs
    assert c.axes == ("expert",)
    assert c.group_size == mesh.shape["expert"]
    expected = (16 // mesh.shape["expert"]) * 32 * F32
    assert c.result_bytes == expected
    assert c.sent_bytes == expected


def test_ppermute_over_two_axes(mesh):
    # a cycle over the 4 (data, expert) positions: pairs differ along both axes.
    f = jax.shard_map(
        lambda v: jax.lax.ppermute(v, ("data", "expert"), [(0, 1), (1, 2), (2, 3), (3, 0)]),
        mesh=mesh,
        in_specs=P(("data", "expert")),
        out_specs=P(("data", "expert")),
    )
    c = jax.jit(f).lower(_sds((16, 4), mesh, P(("data", "expert")))).compile()
    (coll,) = _nontrivial(collectives(c, mesh))
    assert coll.kind == "collective-permute"
    assert coll.axes == ("data", "expert")
    assert coll.result_bytes == (16 // 4) * 4 * F32


@pytest.mark.parametrize(
    "axes",
    [("data",), ("expert",), ("tensor",), ("data", "expert"), ("data", "tensor"),
     ("expert", "tensor"), ("data", "expert", "tensor")],
)  # fmt: skip
def test_psum_axes_every_subset(mesh, axes):
    f = jax.shard_map(lambda v: jax.lax.psum(v, axes), mesh=mesh, in_specs=P(), out_specs=P())
    c = jax.jit(f).lower(jnp.ones((4, 4), jnp.float32)).compile()
    (coll,) = _nontrivial(collectives(c, mesh))
    assert coll.kind == "all-reduce"
    assert coll.axes == axes
    assert coll.group_size == math.prod(mesh.shape[a] for a in axes)
    assert coll.result_bytes == 4 * 4 * F32


@pytest.mark.parametrize(
    "spec,axes",
    [(P(("data", "tensor")), ("data", "tensor")),
     (P(("tensor", "data")), ("data", "tensor")),
     (P(("data", "expert", "tensor")), ("data", "expert", "tensor"))],
)  # fmt: skip
def test_jit_all_gather_multi_axis(mesh, spec, axes):
    # auto-partitioned code prints replica groups in the mesh-axes form with
    # a transposed device_ids list; the axes must still come out right.
    c = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P())).lower(
        _sds((16, 32), mesh, spec)
    ).compile()
    (coll,) = _nontrivial(collectives(c, mesh))
    assert coll.kind == "all-gather"
    assert coll.axes == axes
    assert coll.result_bytes == 16 * 32 * F32


def test_scan_collectives_in_loop(mesh, scan_compiled):
    cs = _nontrivial(collectives(scan_compiled, mesh))
    assert cs and all(c.in_loop for c in cs)
    assert all(c.trip_count == 3 for c in cs)
    assert all(c.axes == ("data",) for c in cs)
    static = summarize(cs)
    weighted = summarize(cs, weight_by_trip_count=True)
    key = (cs[0].kind, ("data",))
    assert weighted[key]["count"] == 3 * static[key]["count"]
    assert weighted[key]["result_bytes"] == 3 * static[key]["result_bytes"]


def test_permuted_device_order(mesh):
    # Replica groups hold partition ids (positions in mesh.devices.flat), not
    # device ids: a mesh whose tensor pairs are devices {0,2}, {1,3}, ...
    devs = jax.devices()
    order = [0, 2, 1, 3, 4, 6, 5, 7]
    pm = Mesh(
        np.array([devs[i] for i in order]).reshape(2, 2, 2),
        ("data", "expert", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
    )
    f = jax.shard_map(lambda v: jax.lax.psum(v, "tensor"), mesh=pm, in_specs=P(), out_specs=P())
    c = jax.jit(f).lower(jnp.ones((4, 4), jnp.float32)).compile()
    (coll,) = _nontrivial(collectives(c, pm))
    assert coll.axes == ("tensor",)
    # Against the standard mesh the same physical pairs {0,2},{1,3} are "expert"
    # neighbours: the compiled device assignment is mapped onto the given mesh.
    (coll,) = _nontrivial(collectives(c, mesh))
    assert coll.axes == ("expert",)


def test_memory_report_argument_bytes(mesh, a2a_compiled, matmul_compiled):
    mem = memory_report(a2a_compiled)
    n = mesh.shape["data"] * mesh.shape["expert"]
    assert mem["argument_bytes"] == 16 * 32 * F32 // n
    for key in ("output_bytes", "temp_bytes", "alias_bytes", "generated_code_bytes"):
        assert key in mem and mem[key] >= 0
    assert mem["total_bytes"] == (
        mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    )
    t = mesh.shape["tensor"]
    mem = memory_report(matmul_compiled)
    assert mem["argument_bytes"] == (16 * 32 + 32 * 8) * F32 // t


def test_summarize_and_report(mesh, matmul_compiled, ppermute_compiled):
    cs = collectives(matmul_compiled, mesh) + collectives(ppermute_compiled, mesh)
    s = summarize(cs)
    assert s[("all-reduce", ("tensor",))]["count"] == 1
    assert s[("all-reduce", ("tensor",))]["result_bytes"] == 16 * 8 * F32
    assert s[("collective-permute", ("expert",))]["count"] == 1
    by_kind = summarize(cs, by=("kind",))
    assert set(by_kind) == {("all-reduce",), ("collective-permute",)}
    with pytest.raises(ValueError, match="unknown fields"):
        summarize(cs, by=("nope",))
    text = report(matmul_compiled, mesh)
    assert "| all-reduce | tensor | 1 |" in text
    assert "argument" in text and "Memory" in text


def test_collectives_rejects_other_types(mesh):
    with pytest.raises(TypeError, match="compiled object"):
        collectives(42, mesh)


# --------------------------------------------------------------------------- #
# hand-written HLO: every replica-group format, async pairs, loops


def _one(text, mesh, **kw):
    cs = collectives(text, mesh)
    assert len(cs) == 1, cs
    return cs[0]


@pytest.mark.parametrize(
    "groups,axes",
    [
        # explicit lists
        ("{{0,1},{2,3},{4,5},{6,7}}", ("tensor",)),
        ("{{0,2},{1,3},{4,6},{5,7}}", ("expert",)),
        ("{{0,4},{1,5},{2,6},{3,7}}", ("data",)),
        ("{{0,2,4,6},{1,3,5,7}}", ("data", "expert")),
        ("{{0,1,2,3,4,5,6,7}}", ("data", "expert", "tensor")),
        ("{}", ("data", "expert", "tensor")),
        # iota: [groups, size]<=[reshape]T(perm)
        ("[4,2]<=[8]", ("tensor",)),
        ("[2,4]<=[8]", ("expert", "tensor")),
        ("[4,2]<=[2,4]T(1,0)", ("data",)),
        ("[2,4]<=[4,2]T(1,0)", ("data", "expert")),
        ("[4,2]<=[2,2,2]T(0,2,1)", ("expert",)),
        ("[1,8]<=[8]", ("data", "expert", "tensor")),
        # mesh-axes form (what this jax version prints for jit-partitioned code)
        ("mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_1'}", ("expert",)),
        ("mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_1'}", ("tensor",)),
        ("mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}", ("data",)),
        ("mesh['axis_0'=2,'axis_1'=1,'axis_2'=2,'axis_3'=2] {'axis_2'}", ("expert",)),
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_0'}",
         ("data", "tensor")),
        ("mesh['axis_0'=2,'axis_1'=2,'axis_2'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_1'}",
         ("tensor",)),
        ("mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}", ("data", "tensor")),
        # sub-axes: x:(pre)size of an 8-wide axis
        ("mesh['x'=8] {'x':(2)2}", ("expert",)),
        ("mesh['x'=8] {'x':(1)2}", ("data",)),
        ("mesh['x'=8] {'x':(1)2,'x':(4)2}", ("data", "tensor")),
        ("mesh['x'=4,'y'=2] {'x':(2)2,'y'}", ("expert", "tensor")),
        # an explicit (non-iota) device_ids list: mesh position i holds id ids[i]
        # (rows [0,2],[4,6],[1,3],[5,7]; ignoring the ids would give "tensor")
        ("mesh['a'=4,'b'=2], device_ids=(0,2,4,6,1,3,5,7) {'b'}", ("expert",)),
    ],
)  # fmt: skip
def test_replica_group_formats(mesh, groups, axes):
    line = (
        "  %all-reduce.3 = f32[16,8]{1,0} all-reduce(f32[16,8]{1,0} %p), channel_id=1, "
        f"replica_groups={groups}, use_global_device_ids=true, to_apply=%add, "
        'metadata={op_name="jit(f)/moe/psum" source_file="x.py" source_line=3}'
    )
    c = _one(line, mesh)
    assert c.kind == "all-reduce"
    assert c.axes == axes
    assert c.group_size == math.prod(mesh.shape[a] for a in axes)
    assert c.result_bytes == 16 * 8 * F32
    assert c.op_name == "jit(f)/moe/psum"
    assert c.name == "all-reduce.3"


def test_parse_replica_groups_values():
    assert parse_replica_groups("[4,2]<=[2,4]T(1,0), foo") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert parse_replica_groups("{{0,1},{2,3}}, channel_id=1") == [[0, 1], [2, 3]]
    assert parse_replica_groups("{}") == []
    # [4,2]T(1,0) device ids = iota(8).reshape(4,2).T = 0,2,4,6,1,3,5,7 on a (1,2,4) mesh
    groups = parse_replica_groups(
        "mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_1'}"
    )
    assert sorted(map(sorted, groups)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert parse_replica_groups("mesh['a'=8] {}") == [[i] for i in range(8)]
    assert parse_replica_groups("maximal_mesh[device_id=3] {}") == [[3]]


def test_match_axes_unknown_and_trivial(mesh):
    assert match_axes([[0, 3], [1, 2], [4, 7], [5, 6]], mesh) == ("?",)
    assert match_axes([[i] for i in range(8)], mesh) == ()
    # a size-1 mesh axis never shows up in the answer
    m = make_mesh(1, 4, 2)
    assert match_axes([[0, 2, 4, 6], [1, 3, 5, 7]], m) == ("expert",)


def test_unmatched_groups_do_not_crash(mesh):
    line = (
        "  %ar = f32[8]{0} all-reduce(f32[8]{0} %p), channel_id=1, "
        "replica_groups={{0,3},{1,2},{4,7},{5,6}}, use_global_device_ids=true, to_apply=%add"
    )
    c = _one(line, mesh)
    assert c.axes == ("?",) and not c.trivial and c.group_size == 2


def test_trivial_groups_flagged_and_left_out_of_summary(mesh):
    line = (
        "  %ar = f32[8]{0} all-reduce(f32[8]{0} %p), channel_id=1, "
        "replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add"
    )
    c = _one(line, mesh)
    assert c.trivial and c.axes == () and c.group_size == 1 and c.sent_bytes == 0
    assert summarize([c]) == {}
    assert summarize([c], include_trivial=True)[("all-reduce", ())]["count"] == 1


def test_tuple_all_reduce_counts_once_with_summed_bytes(mesh):
    line = (
        "  %all-reduce = (f32[4,4]{1,0}, bf16[3]{0}, s8[5]{0}) all-reduce(%a, %b, %c), "
        "channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, "
        "to_apply=%region_0.0"
    )
    c = _one(line, mesh)
    expected = 4 * 4 * 4 + 3 * 2 + 5 * 1
    assert c.result_bytes == expected
    assert c.sent_bytes == pytest.approx(2 * expected * (2 - 1) / 2)


ASYNC_HLO = """\
HloModule jit_step, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%wrapped_all_to_all (p0: f32[8,16]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  ROOT %all-to-all.7 = f32[8,16]{1,0} all-to-all(f32[8,16]{1,0} %p0), channel_id=4, replica_groups=[4,2]<=[2,2,2]T(0,2,1), dimensions={0}
}

ENTRY %main.9 (p: f32[8,32], q: f32[16]) -> f32[16,32] {
  %p = f32[8,32]{1,0} parameter(0)
  %q = f32[16]{0} parameter(1)
  %all-gather-start = (f32[8,32]{1,0}, f32[16,32]{1,0}) all-gather-start(f32[8,32]{1,0} %p), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(step)/moe/all_gather"}
  %all-gather-done = f32[16,32]{1,0} all-gather-done((f32[8,32]{1,0}, f32[16,32]{1,0}) %all-gather-start)
  %all-reduce-start = f32[16]{0} all-reduce-start(f32[16]{0} %q), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add
  %all-reduce-done = f32[16]{0} all-reduce-done(f32[16]{0} %all-reduce-start)
  %collective-permute-start = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(f32[16]{0} %all-reduce-done), channel_id=3, source_target_pairs={{0,2},{2,0},{1,3},{3,1},{4,6},{6,4},{5,7},{7,5}}
  %collective-permute-done = f32[16]{0} collective-permute-done((f32[16]{0}, f32[16]{0}, u32[], u32[]) %collective-permute-start)
  %x = f32[8,16]{1,0} slice(f32[16,32]{1,0} %all-gather-done), slice={[0:8], [0:16]}
  %a2a-start = ((f32[8,16]{1,0}), f32[8,16]{1,0}, s32[]) async-start(f32[8,16]{1,0} %x), calls=%wrapped_all_to_all
  %a2a-done = f32[8,16]{1,0} async-done(((f32[8,16]{1,0}), f32[8,16]{1,0}, s32[]) %a2a-start), calls=%wrapped_all_to_all
  ROOT %out = f32[16,32]{1,0} copy(f32[16,32]{1,0} %all-gather-done)
}
"""


def test_async_start_done_pairs(mesh):
    cs = collectives(ASYNC_HLO, mesh)
    kinds = {c.kind: c for c in cs}
    assert sorted(kinds) == ["all-gather", "all-reduce", "all-to-all", "collective-permute"]
    assert len(cs) == 4  # the -done halves are not counted
    ag = kinds["all-gather"]
    assert ag.axes == ("data",)
    assert ag.result_bytes == 16 * 32 * F32  # the done's shape, not the (in, out) tuple
    assert ag.sent_bytes == pytest.approx(16 * 32 * F32 / 2)
    assert ag.op_name == "jit(step)/moe/all_gather"
    assert ag.computation == "main.9"
    ar = kinds["all-reduce"]
    assert ar.axes == ("tensor",) and ar.result_bytes == 16 * F32
    cp = kinds["collective-permute"]
    assert cp.axes == ("expert",) and cp.result_bytes == 16 * F32 and cp.sent_bytes == 16 * F32
    a2a = kinds["all-to-all"]
    assert a2a.axes == ("expert",) and a2a.computation == "wrapped_all_to_all"
    assert a2a.result_bytes == 8 * 16 * F32
    assert not any(c.in_loop for c in cs)


def test_async_start_without_done_uses_output_element(mesh):
    line = (
        "  %ags = (f32[8,32]{1,0}, f32[16,32]{1,0}) all-gather-start(f32[8,32]{1,0} %p), "
        "channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}"
    )
    c = _one(line, mesh)
    assert c.kind == "all-gather" and c.axes == ("data",) and c.result_bytes == 16 * 32 * F32


LOOP_HLO = """\
HloModule jit_loop

%inner_body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %v = f32[8]{0} get-tuple-element((s32[], f32[8]{0}) %t), index=1
  %i = s32[] get-tuple-element((s32[], f32[8]{0}) %t), index=0
  %ar = f32[8]{0} all-reduce(f32[8]{0} %v), channel_id=2, replica_groups={{0,2},{1,3},{4,6},{5,7}}, to_apply=%add
  ROOT %r = (s32[], f32[8]{0}) tuple(s32[] %i, f32[8]{0} %ar)
}

%inner_cond (t: (s32[], f32[8])) -> pred[] {
  %t = (s32[], f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %a2a = (f32[4]{0}, f32[4]{0}) all-to-all(f32[4]{0} %x, f32[4]{0} %y), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}
  ROOT %w = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %t), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"5"}}
}

%outer_cond (t: (s32[], f32[8])) -> pred[] {
  %t = (s32[], f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%unknown_body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %ag = f32[16]{0} all-gather(f32[8]{0} %v), channel_id=3, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}
  ROOT %r = (s32[], f32[8]{0}) tuple(s32[] %i, f32[8]{0} %v)
}

ENTRY %main (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %top = f32[8]{0} all-reduce(f32[8]{0} %q), channel_id=4, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %w0 = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %p), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %w1 = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %w0), condition=%outer_cond, body=%unknown_body
}
"""


def test_while_loops_trip_counts(mesh):
    cs = {c.name: c for c in collectives(LOOP_HLO, mesh)}
    assert set(cs) == {"ar", "a2a", "ag", "top"}
    assert not cs["top"].in_loop and cs["top"].trip_count is None
    assert cs["a2a"].in_loop and cs["a2a"].trip_count == 3
    assert cs["a2a"].computation == "outer_body" and cs["a2a"].axes == ("tensor",)
    assert cs["ar"].in_loop and cs["ar"].trip_count == 3 * 5  # nested loops multiply
    assert cs["ag"].in_loop and cs["ag"].trip_count is None  # not known
    w = summarize(cs.values(), by=("name",), weight_by_trip_count=True)
    assert w[("ar",)]["count"] == 15 and w[("ag",)]["count"] == 1 and w[("top",)]["count"] == 1


def test_shape_bytes():
    assert shape_bytes("f32[16,8]{1,0}") == 512
    assert shape_bytes("f32[]") == 4
    assert shape_bytes("(f32[2,3]{1,0}, bf16[4]{0})") == 2 * 3 * 4 + 4 * 2
    assert shape_bytes("((f32[2]{0}, f32[2]{0}), s32[])") == 8 + 8 + 4
    assert shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == 8 * 128 * 2
    assert shape_bytes("f32[<=8,4]{1,0}") == 8 * 4 * 4
    assert shape_bytes("pred[3]{0}") == 3
    assert shape_bytes("s4[3]{0}") == 2  # packed nibbles, rounded up


def test_collective_is_frozen():
    c = Collective("all-reduce", ("data",), 4, 4.0, 2, "f32[]", "", "main", False)
    with pytest.raises(AttributeError):
        c.kind = "x"  # type: ignore[misc]


def test_unknown_forms_report_question_mark(mesh):
    hlo = (
        "  %ar = f32[8]{0} all-reduce(f32[8]{0} %p), replica_groups=<<new format>>, to_apply=%add\n"
        "  %cp = f32[8]{0} collective-permute(f32[8]{0} %p), channel_id=2, slice_sizes={{8}}\n"
    )
    ar, cp = collectives(hlo, mesh)
    assert ar.axes == ("?",) and ar.result_bytes == 32 and not ar.trivial
    assert cp.axes == ("?",) and cp.result_bytes == 32 and cp.sent_bytes == 32


def test_lowered_stablehlo_is_rejected(mesh):
    lowered = jax.jit(lambda x: x + 1).lower(jnp.ones(4))
    with pytest.raises(ValueError, match="compile"):
        collectives(lowered, mesh)
