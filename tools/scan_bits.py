"""Why scanned layers differ from the unrolled loop in the last bits on XLA:CPU, and which XLA decisions decide.

    python tools/scan_bits.py                  # every case (45, minutes), each in its own process (XLA_FLAGS
                                               # are read at import); --flags, --unit or --remat narrow the sweep
    python tools/scan_bits.py --flags tests --unit tedjax --remat none
    python tools/scan_bits.py --flags tests-exact --unit tedjax --remat full

One function `unit(params, x)` run over U = 2 stacked units by a Python loop
and by `lax.scan`, with `jax.value_and_grad` of the same loss; the gradients
are compared bit for bit. Units:

  norm_linear  x + rmsnorm(x) @ w, x [128, 32], plain JAX: the smallest found
  block        a pre-norm (attention, GELU MLP) block, x [8, 16, 32], plain JAX
  tedjax       tests/test_scan.py's DEEP model (5 layers, two scanned units of
               (dense, MoE) and a dense tail) on 1 device, `model.scan_layers`
               true vs false, as the test compiles it (8 host devices)

Flags: `default` (XLA's), `tests` (tests/compile_flags.py) and the tests' with
one or both of XLA:CPU's two context-dependent rounding decisions turned off:
`tests-no-fma` (`--xla_cpu_max_isa=AVX`: no FMA instructions), `tests-no-ynn`
(`--xla_cpu_experimental_ynn_fusion_type=`: no YNNPACK library fusions) and
`tests-exact` (both).

The cause (measured 2026-12-07, jax 0.10.2, AMD EPYC with AVX-512):
1. FMA contraction. XLA:CPU lets LLVM contract a multiply and an add that sit
   in one fused kernel into one FMA (one rounding instead of two). Which
   multiply-add pairs share a kernel depends on the fusion around the units:
   the scan's while bodies are compiled apart, the loop's units inline, where
   XLA fuses across unit boundaries. In norm_linear the loop fuses the loss's
   gradient `(x + x) * 2^-12` into the last unit's backward kernel
   (`add(multiply(x + x, 2^-12), multiply(dy, rsqrt))`: an add of two
   products, only one of which an FMA can absorb), where the scan's body adds
   `dy * rsqrt` to the incoming cotangent, a carry loaded from memory, one FMA:
   552 of 1024 entries of w[0] differ by 1-2 ulps.
   With `tests-no-fma` (AVX: the same 256-bit vectors, no FMA) norm_linear is
   bit-equal; with `--xla_cpu_max_isa=AVX2` (FMA) it is not. (The `--loss sum`
   variant is bit-equal because its gradient `x + x` has no multiply to contract.)
2. YNNPACK fusions (`kind=kCustom`, `__ynn_fusion`: dots, multiply+reduce,
   exp+subtract+reduce, add+dot+reduce subgraphs), only without remat, where
   the two tedjax programs are not the same computation (the scan wraps its
   unit in `save_all_but_elementwise`, the loop does not): the subgraphs form
   differently and change the forward itself (a gradient program that also
   returns the logits shows them differing; the loss happens to agree), so
   that with FMA off alone all 28 gradient leaves still differ; with YNN off
   alone 18-20 of 28 (the units and the embedding; logits, head, final norm
   and tail become equal).
With remat full or cac (the same checkpoint both ways) `tests-no-fma` alone
makes the tedjax loop and scan bit-equal on all 28 leaves; without remat
`tests-exact` does (and so did FMA off alone with the loop given the scan's
checkpoint policy, a one-line change to `run_units` measured and not kept).
An `optimization_barrier` around each unit cannot separate the fusions:
XLA:CPU's `cse_barrier_expander` removes the barriers before fusion
(`--xla_dump_hlo_pass_re=.*`: present up to pass 0006, gone after
`cse_barrier_expander`). `xla_cpu_max_isa` is read per process, not from
`compile(compiler_options=...)`; the YNN option is honoured per compile.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from compile_flags import FAST_COMPILE_FLAGS as TESTS  # noqa: E402  (the tests' flags; no jax)

NO_FMA, NO_YNN = "--xla_cpu_max_isa=AVX", "--xla_cpu_experimental_ynn_fusion_type="
FLAGS = {"default": "", "tests": TESTS, "tests-no-fma": f"{TESTS} {NO_FMA}", "tests-no-ynn": f"{TESTS} {NO_YNN}",
         "tests-exact": f"{TESTS} {NO_FMA} {NO_YNN}"}
UNITS = ("norm_linear", "block", "tedjax")
REMATS = {"norm_linear": ("none", "full", "elementwise"), "block": ("none", "full", "elementwise"),
          "tedjax": ("none", "full", "cac")}
U, B, L, D, H = 2, 8, 16, 32, 4


def tedjax_case(flags: str, remats: list[str]) -> None:
    """tests/test_scan.py's comparison: DEEP looped and scanned on 1 device of 8 simulated ones, for each remat
    setting (one process: XLA_FLAGS are read once)."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {FLAGS[flags]}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    import numpy as np

    import tedjax

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = tedjax.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, 64, (8, 17))  # tests/reference.py small_batch
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
    for remat in remats:
        deep = tedjax.ModelConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=4, d_ff=64, max_len=16,
                                  num_experts=4, expert_d_ff=32, top_k=2, capacity_factor=1.0, min_capacity=1,
                                  remat=remat)
        _compare_loop_and_scan(deep, mesh, batch, flags)


def _compare_loop_and_scan(deep, mesh, batch, flags: str) -> None:
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    import tedjax

    remat = deep.remat
    results = []
    for scan in (False, True):
        graphdef, params, rest = nnx.split(tedjax.init_model(dataclasses.replace(deep, scan_layers=scan), mesh),
                                           nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

        def grad_fn(params, batch, graphdef=graphdef, rest=rest):
            loss_of = lambda p: tedjax.loss_fn(nnx.merge(graphdef, p, rest), batch)[0]  # noqa: E731
            return jax.value_and_grad(loss_of)(params)

        with jax.set_mesh(mesh):
            results.append(jax.jit(grad_fn)(params, batch))
    (loss_a, grads_a), (loss_b, grads_b) = results
    leaves = [(jax.tree_util.keystr(path), np.asarray(a), np.asarray(b))
              for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_a)[0], jax.tree.leaves(grads_b))]
    differing = [(name, np.abs(a - b).max() / np.abs(a).max() / np.finfo(np.float32).eps)
                 for name, a, b in leaves if (a != b).any()]
    worst = max(differing, key=lambda d: d[1]) if differing else None
    print(f"flags={flags} unit=tedjax remat={remat}: loss equal {bool(loss_a == loss_b)}; gradient leaves differing: "
          f"{len(differing)} of {len(leaves)}" + (f", at most {worst[1]:.1f} eps of the leaf's largest entry "
                                                  f"({worst[0]})" if worst else ""))


def main(flags: str, unit_name: str, remat: str, loss: str = "mean") -> None:
    if unit_name == "tedjax":
        return tedjax_case(flags, remat.split(","))
    os.environ["XLA_FLAGS"] = FLAGS[flags]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")

    def norm(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    def block(p, x):  # [B, L, D] -> [B, L, D]
        h = norm(x)
        q, k, v = (jnp.einsum("bld,dhk->blhk", h, p[n]) for n in ("wq", "wk", "wv"))
        x = x + jnp.einsum("blhk,hkd->bld", jax.nn.dot_product_attention(q, k, v, is_causal=True), p["wo"])
        return x + jnp.einsum("blf,fd->bld", jax.nn.gelu(jnp.einsum("bld,df->blf", norm(x), p["w_in"])), p["w_out"])

    def norm_linear(p, x):  # [T, D] -> [T, D]
        return x + norm(x) @ p["w"]

    unit = {"block": block, "norm_linear": norm_linear}[unit_name]
    elementwise = {"add", "sub", "mul", "div", "exp", "tanh", "rsqrt", "integer_pow", "pow", "broadcast_in_dim",
                   "reshape", "transpose", "convert_element_type", "select_n", "max", "square", "log", "neg"}
    if remat == "full":
        unit = jax.checkpoint(unit, prevent_cse=False)
    elif remat == "elementwise":  # tedjax.model.save_all_but_elementwise's kind of policy
        unit = jax.checkpoint(unit, policy=lambda prim, *_, **__: prim.name not in elementwise, prevent_cse=False)

    reduce = {"mean": jnp.mean, "sum": jnp.sum}[loss]

    def loss_loop(ps, x):
        for u in range(U):
            x = unit(jax.tree.map(lambda a, u=u: a[u], ps), x)
        return reduce(x * x)

    def loss_scan(ps, x):
        return reduce(jax.lax.scan(lambda x, p: (unit(p, x), None), x, ps)[0] ** 2)

    keys = jax.random.split(jax.random.key(0), 7)
    if unit_name == "block":
        shapes = {"wq": (D, H, D // H), "wk": (D, H, D // H), "wv": (D, H, D // H), "wo": (H, D // H, D),
                  "w_in": (D, 2 * D), "w_out": (2 * D, D)}
        x = jax.random.normal(keys[-1], (B, L, D), jnp.float32)
    else:
        shapes, x = {"w": (D, D)}, jax.random.normal(keys[-1], (B * L, D), jnp.float32)
    ps = {n: jax.random.normal(k, (U, *s), jnp.float32) / np.sqrt(s[0]) for k, (n, s) in zip(keys, shapes.items())}
    (loss_a, grads_a), (loss_b, grads_b) = (jax.jit(jax.value_and_grad(f))(ps, x) for f in (loss_loop, loss_scan))
    differing = {f"{n}[{u}]": int(np.sum(np.asarray(grads_a[n][u]) != np.asarray(grads_b[n][u])))
                 for n in grads_a for u in range(U)}
    size = grads_a[next(iter(grads_a))][0].size
    print(f"flags={flags} unit={unit_name} remat={remat} loss={loss}: loss equal {bool(loss_a == loss_b)}; "
          f"gradient entries differing (of {size} per weight): {({k: v for k, v in differing.items() if v}) or 'none'}")
    for n in grads_a:
        a, b = np.asarray(grads_a[n]), np.asarray(grads_b[n])
        if (a != b).any():
            i = int(np.flatnonzero(a != b)[0])
            print(f"  first in {n}: loop {a.flat[i]!r} ({a.view(np.uint32).flat[i]:#010x}), "
                  f"scan {b.flat[i]!r} ({b.view(np.uint32).flat[i]:#010x})")
            break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", choices=sorted(FLAGS))
    parser.add_argument("--unit", choices=UNITS)
    parser.add_argument("--remat", help="none, full, elementwise (plain JAX units only) or cac (tedjax only); "
                        "tedjax takes a comma-separated list, run in one process")
    parser.add_argument("--loss", choices=("mean", "sum"), default="mean",
                        help="of the squared outputs (plain JAX units; tedjax: its own loss)")
    args = parser.parse_args()
    allowed = REMATS[args.unit] if args.unit else sorted({r for rs in REMATS.values() for r in rs})
    for remat in args.remat.split(",") if args.remat else ():
        if remat not in allowed:
            parser.error(f"--remat {remat} is not a case of --unit {args.unit or 'any'}: choose from {allowed}")
    if args.remat and "," in args.remat and args.unit != "tedjax":
        parser.error("a comma-separated --remat list is for --unit tedjax only")
    if args.flags and args.unit and args.remat:
        main(args.flags, args.unit, args.remat, args.loss)
    else:
        for flags in [args.flags] if args.flags else sorted(FLAGS):
            for unit in [args.unit] if args.unit else UNITS:
                for remat in [args.remat] if args.remat else REMATS[unit]:
                    subprocess.run([sys.executable, __file__, "--flags", flags, "--unit", unit, "--remat", remat,
                                    "--loss", args.loss], check=True)
