"""Why scanned layers cannot equal the unrolled loop bit for bit in f32 on XLA:CPU: a minimal reproduction.

    python tools/scan_bits.py            # every case, each in its own process (XLA_FLAGS are read at import)
    python tools/scan_bits.py --flags tests --unit norm_linear --remat none

One function `unit(params, x)` in plain JAX, no tedjax, run over U = 2 stacked
units by a Python loop and by `lax.scan`, with `jax.value_and_grad` of the
same loss; the gradients are compared bit for bit. Units:

  norm_linear  x + rmsnorm(x) @ w, x [128, 32]: the smallest found (at
               [4, 4] two of 16 entries differ under the tests' flags)
  block        a pre-norm (attention, GELU MLP) block, x [8, 16, 32]

The loss agrees; gradients differ in the last bits for both units, with no
remat, with full remat and with a save-all-but-elementwise policy alike,
under the default XLA:CPU flags and under the tests' fast-compile flags
(tests/compile_flags.py), and with XLA:CPU's YNN/XNNPACK fusions turned off.
(A residual linear map without the norm, or attention without the norm, is
bit-equal; so is norm_linear under the tests' flags with `--loss sum`, the
sum of the squared outputs instead of their mean, whose gradient differs only
by an exact power of two, and with `jax.vjp` of a fixed cotangent: what XLA
fuses around the units decides, not the units.) XLA compiles the scan's while body as a computation of its own,
so it fuses and schedules the backward's ops differently from the loop's
straight-line program (which, for instance, fuses the loss's gradient into the
last unit's backward); the math is the same, the rounding is not. Which
fused op rounds differently was not pinned down. Measured 2026-12-06, jax
0.10.2: 1-2 float32 ulps in about half of the earlier unit's entries.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

FLAGS = {"default": "", "tests": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"}
U, B, L, D, H = 2, 8, 16, 32, 4


def main(flags: str, unit_name: str, remat: str, loss: str = "mean") -> None:
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
    print(f"flags={flags} unit={unit_name} remat={remat} loss={loss}: loss equal {bool(loss_a == loss_b)}; gradient entries "
          f"differing (of {size} per weight): {({k: v for k, v in differing.items() if v}) or 'none'}")
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
    parser.add_argument("--unit", choices=("norm_linear", "block"))
    parser.add_argument("--remat", choices=("none", "full", "elementwise"))
    parser.add_argument("--loss", choices=("mean", "sum"), default="mean", help="of the squared outputs")
    args = parser.parse_args()
    if args.flags and args.unit and args.remat:
        main(args.flags, args.unit, args.remat, args.loss)
    else:
        for flags in [args.flags] if args.flags else sorted(FLAGS):
            for unit in [args.unit] if args.unit else ("norm_linear", "block"):
                for remat in [args.remat] if args.remat else ("none", "full", "elementwise"):
                    subprocess.run([sys.executable, __file__, "--flags", flags, "--unit", unit, "--remat", remat,
                                    "--loss", args.loss], check=True)
