"""tedjax's MoE layer against DeepSpeed-MoE's, on the same CPU, alternating in one run.

Target (issue 15): tedjax tokens/s >= 1.5x DeepSpeed-MoE 0.19.8's in every case:

  top1_ep8  top-1, capacity factor 1.0,  expert parallel 8 (tedjax mesh (data, expert, tensor) = (1,8,1))
  top1_ep4  top-1, capacity factor 1.0,  expert parallel 4 (tedjax (2,4,1); DeepSpeed ep_size 4)
  top2_ep8  top-2, capacity factor 1.25, expert parallel 8 (tedjax (1,8,1))

Shapes, both sides: E=8 experts, D=256, F=1024 GELU experts, 1024 tokens per
worker = one routing group per worker, 8 workers, min capacity 4, no token
jitter. One step is the forward and the backward of
mean(y**2) + 0.01 * aux_loss, with gradients w.r.t. the layer's parameters and
its input; nothing is updated.

  tedjax     `tedjax.MoE` as a user builds it (`tedjax.create_sharded` on
             `tedjax.make_mesh`), input [8, 1024, 256] split over the batch,
             `jax.value_and_grad` jitted and compiled once per case, on 8
             simulated XLA:CPU devices (one process, XLA's own thread pool).
  DeepSpeed  `deepspeed.moe.layer.MoE` in 8 torchrun CPU processes with 1
             thread each over gloo (benchmarks/peer_deepspeed_worker.py), in
             the peer's own virtual environment: torch and deepspeed are never
             tedjax dependencies. Expert groups are made as DeepSpeed's engine
             makes them. The engine's gradient all-reduces are not in its step;
             tedjax's step contains the ones its sharding implies (router
             gradients over all 8 devices, expert gradients over "data" at
             (2,4,1)), so the comparison does not favour tedjax.

Both sides run in subprocesses that start once: tedjax with its own
XLA_FLAGS (8 devices) and JAX_PLATFORMS=cpu, DeepSpeed as a torchrun server
(starting it, 8 processes importing deepspeed, takes about a minute). Each
round measures every case on both sides, one right after the other, the side
that goes first alternating from round to round; each measurement is
`--warmup` untimed steps then `--steps` timed ones (median). The verdict of a
case is the median over rounds of the per-round ratio tedjax tokens/s /
DeepSpeed tokens/s: the machine is shared and noisy, and both sides of a round
see the same load. tokens/s = 8 x 1024 / median step time.

    python benchmarks/peer_deepspeed.py             # full run -> benchmarks/results/peer_deepspeed.{json,md}
    python benchmarks/peer_deepspeed.py --quick     # tedjax side only, a few steps (what CI runs) -> a temp dir
    python benchmarks/peer_deepspeed.py --setups default avx2 one_core   # stand-ins for other CPUs, one run

Setups (issue 25 item 7), each applied to both sides alike, one after the other in one run:

  default   this CPU as it is.
  avx2      a stand-in for an AVX2-only x86 CPU: tedjax with --xla_cpu_max_isa=AVX2 added to its XLA_FLAGS,
            torch with ATEN_CPU_CAPABILITY=avx2 (its ready record shows the ISA torch then dispatches to).
  one_core  both sides under `taskset -c 0`: XLA's thread pool and the 8 torchrun ranks share one CPU.

Besides wall time, each side's CPU time per step is recorded (tedjax: its process, all threads; DeepSpeed:
the 8 ranks summed), and tokens per CPU-second are compared too: on a loaded machine they move less than wall
time.

The peer's environment (default ~/ds-venv, or --peer-venv / $TEDJAX_PEER_VENV),
made once, outside the repository:

    python3 -m venv ~/ds-venv
    ~/ds-venv/bin/pip install numpy torch==2.14.1
    DS_BUILD_OPS=0 ~/ds-venv/bin/pip install deepspeed==0.19.8

Without it the script measures the tedjax side, prints these commands, marks
the peer as not measured (never PASS) and exits with status 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # _common
sys.path.insert(0, str(REPO))  # tedjax

NAME = "peer_deepspeed"
TARGET_RATIO = 1.5
WORKERS = 8
PEER_VENV_ENV = "TEDJAX_PEER_VENV"
DEFAULT_PEER_VENV = "~/ds-venv"
WORKER_SCRIPT = HERE / "peer_deepspeed_worker.py"
RESULT_MARK = "@@result "  # prefix of the tedjax server's answers on stdout (anything else there is noise)
DEVICE_FLAG = "--xla_force_host_platform_device_count"
SETUP_COMMANDS = (
    "python3 -m venv ~/ds-venv",
    "~/ds-venv/bin/pip install numpy torch==2.14.1",
    "DS_BUILD_OPS=0 ~/ds-venv/bin/pip install deepspeed==0.19.8",
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    top_k: int
    capacity_factor: float
    data: int  # tedjax mesh (data, expert, 1); DeepSpeed ep_size = expert
    expert: int

    @property
    def label(self) -> str:
        return f"top-{self.top_k}, cf {self.capacity_factor}, expert {self.expert}" + (
            f" (data {self.data})" if self.data > 1 else "")

    @property
    def mesh(self) -> str:
        return f"({self.data},{self.expert},1)"


CASES = (
    Case("top1_ep8", 1, 1.0, 1, 8),
    Case("top1_ep4", 1, 1.0, 2, 4),
    Case("top2_ep8", 2, 1.25, 1, 8),
)
CASES_BY_NAME = {c.name: c for c in CASES}


@dataclasses.dataclass(frozen=True)
class Setup:
    """How both sides are started: a stand-in for another CPU on this one."""

    name: str
    xla_flags: tuple[str, ...] = ()  # added to the tedjax side's XLA_FLAGS
    torch_env: tuple[tuple[str, str], ...] = ()  # added to the peer's environment
    prefix: tuple[str, ...] = ()  # put before both sides' commands

    @property
    def label(self) -> str:
        parts = [*self.xla_flags, *(f"{k}={v}" for k, v in self.torch_env), *self.prefix]
        return f"{self.name} ({' '.join(parts)})" if parts else self.name


SETUPS = (
    Setup("default"),
    Setup("avx2", xla_flags=("--xla_cpu_max_isa=AVX2",), torch_env=(("ATEN_CPU_CAPABILITY", "avx2"),)),
    Setup("one_core", prefix=("taskset", "-c", "0")),
)
SETUPS_BY_NAME = {s.name: s for s in SETUPS}


# --------------------------------------------------------------------------- tedjax side (its own process)


class TedjaxLayer:
    """One case's `tedjax.MoE` on its mesh, placed as a user would, and its compiled forward + backward."""

    def __init__(self, case: Case, args: argparse.Namespace):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import tedjax

        self.mesh = tedjax.make_mesh(case.data, case.expert, 1)

        def make() -> tedjax.MoE:
            return tedjax.MoE(args.d_model, args.experts, args.d_ff, top_k=case.top_k,
                              capacity_factor=case.capacity_factor, min_capacity=args.min_capacity,
                              activation="gelu", rngs=nnx.Rngs(0))  # fmt: skip

        layer = tedjax.create_sharded(make, self.mesh)
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
        shape = (WORKERS, args.tokens, args.d_model)  # [B, L, D]: one routing group (sequence) per worker
        x_bld = jax.device_put(jax.random.normal(jax.random.key(1), shape),
                               tedjax.named_sharding(self.mesh, ("batch", None, None)))  # fmt: skip

        def loss_fn(params, x_bld):
            y_bld, stats = nnx.merge(graphdef, params, rest)(x_bld)
            return jnp.mean(jnp.square(y_bld)) + 0.01 * stats.aux_loss, stats.dropped_fraction

        start = time.perf_counter()
        with tedjax.use_mesh(self.mesh):
            grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
            self.compiled = grad_fn.lower(params, x_bld).compile()
        self.compile_s = time.perf_counter() - start
        import _common

        self.gflop = float(_common.xla_cost(self.compiled)["flops"]) * len(self.mesh.devices.flat) / 1e9
        self.args = (params, x_bld)
        self.capacity = tedjax.routing.capacity(args.tokens, args.experts, case.top_k, case.capacity_factor,
                                                args.min_capacity)
        (loss, dropped), _ = self.compiled(*self.args)
        self.first_loss, self.dropped_fraction = float(loss), float(dropped)

    def step(self) -> tuple[float, float]:
        """Wall and process CPU seconds (all threads) of one forward + backward."""
        import jax

        with jax.set_mesh(self.mesh):
            cpu, start = time.process_time(), time.perf_counter()
            jax.block_until_ready(self.compiled(*self.args))
            return time.perf_counter() - start, time.process_time() - cpu

    def measure(self, warmup: int, steps: int, tokens_per_step: int) -> dict:
        for _ in range(warmup):
            self.step()
        walls, cpus = zip(*(self.step() for _ in range(steps)))
        med = statistics.median(walls)
        return {"median_step_s": med, "tokens_per_s": tokens_per_step / med, "times_s": list(walls),
                "cpu_s": list(cpus)}  # fmt: skip


def serve_tedjax(args: argparse.Namespace) -> None:
    """Answer measurement requests (JSON lines on stdin) with JSON lines on stdout, until stdin closes."""
    import _common

    def answer(obj: dict) -> None:
        print(RESULT_MARK + json.dumps(_common._jsonable(obj), allow_nan=False), flush=True)

    try:  # benchmarks/_common applies it on import (as train.py does); record whether this process has it
        from tedjax.host import reuse_freed_host_memory

        malloc_reuse = reuse_freed_host_memory()
    except ImportError:
        malloc_reuse = None
    # the ceiling of any step of this layer on this CPU: its expert products alone (one device's rows at
    # top-1 cf 1.0 with expert 8), bare
    roof = _common.matmul_roof(_common.expert_matmul_shapes(WORKERS * args.tokens // args.experts, args.d_model,
                                                            args.d_ff), reps=3 if args.quick else 20)
    answer({"ready": True, "machine": {**_common.machine_info(), "reuse_freed_host_memory": malloc_reuse},
            "matmul_roof": roof})
    layers: dict[str, TedjaxLayer] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        case = CASES_BY_NAME[cmd["case"]]
        if case.name not in layers:
            layers[case.name] = TedjaxLayer(case, args)
        layer = layers[case.name]
        result = layer.measure(cmd["warmup"], cmd["steps"], WORKERS * args.tokens)
        answer({**result, "compile_s": layer.compile_s, "capacity": layer.capacity, "first_loss": layer.first_loss,
                "dropped_fraction": layer.dropped_fraction, "gflop": layer.gflop})  # fmt: skip


class TedjaxClient:
    """The tedjax server process: started once, with 8 simulated CPU devices in its own XLA_FLAGS."""

    def __init__(self, args: argparse.Namespace, workdir: Path, setup: Setup = SETUPS[0]):
        env = dict(os.environ)
        flags = " ".join([env.get("XLA_FLAGS", ""), *setup.xla_flags]).strip()
        env["XLA_FLAGS"] = flags
        if DEVICE_FLAG in flags:
            if f"{DEVICE_FLAG}={WORKERS}" not in flags.split():
                raise SystemExit(f"XLA_FLAGS={flags!r} sets another device count; this benchmark needs "
                                 f"{DEVICE_FLAG}={WORKERS} (unset XLA_FLAGS or fix that flag)")  # fmt: skip
        else:
            env["XLA_FLAGS"] = f"{flags} {DEVICE_FLAG}={WORKERS}".strip()
        env["JAX_PLATFORMS"] = "cpu"  # the comparison is on this CPU, even on a host with accelerators
        self.log_path = workdir / f"tedjax_server_{setup.name}.log"
        self._log = open(self.log_path, "w")
        cmd = [*setup.prefix, sys.executable, str(Path(__file__).resolve()), "--serve-tedjax",
               *_forward_shape_args(args)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True)  # fmt: skip
        self._ready: dict | None = None

    @property
    def ready(self) -> dict:
        """The server's first answer (machine info), read on first use so the caller can work meanwhile."""
        if self._ready is None:
            self._ready = self._read()
        return self._ready

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
        self.proc.wait()
        self._log.flush()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(f"the tedjax side stopped (exit status {self.proc.returncode}); its log ends:\n{tail}")

    def measure(self, case: Case, warmup: int, steps: int) -> dict:
        self.proc.stdin.write(json.dumps({"case": case.name, "warmup": warmup, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _forward_shape_args(args: argparse.Namespace) -> list[str]:
    return ["--experts", str(args.experts), "--d-model", str(args.d_model), "--d-ff", str(args.d_ff),
            "--tokens", str(args.tokens), "--min-capacity", str(args.min_capacity)]  # fmt: skip


# --------------------------------------------------------------------------- DeepSpeed side (torchrun server)


def peer_venv(args: argparse.Namespace) -> Path:
    return Path(os.path.expanduser(args.peer_venv or os.environ.get(PEER_VENV_ENV) or DEFAULT_PEER_VENV))


def check_peer(venv: Path) -> tuple[dict | None, str]:
    """(versions, "") when `venv` can run the peer, else (None, why not)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None, f"no Python at {python}"
    probe = ("import json, torch, torch.distributed.run, deepspeed; "
             "print(json.dumps({'torch_version': torch.__version__, 'deepspeed_version': deepspeed.__version__}))")
    try:
        proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None, f"{python} took over 10 minutes to import torch and deepspeed"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"{python} cannot import torch, torch.distributed.run and deepspeed: {last}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def setup_help(venv: Path, why: str) -> str:
    lines = [f"SKIP DeepSpeed-MoE peer: {why}.",
             "Make its environment once, outside the repository (torch is several GB, and torch and deepspeed",
             "are never tedjax dependencies):", ""]  # fmt: skip
    lines += [f"    {c}" for c in SETUP_COMMANDS]
    lines += ["", (f"then run this script again; --peer-venv DIR or {PEER_VENV_ENV}=DIR points it at another "
                   f"environment (now: {venv}).")]  # fmt: skip
    return "\n".join(lines)


class PeerServer:
    """benchmarks/peer_deepspeed_worker.py --serve under torchrun: 8 CPU workers, started once."""

    def __init__(self, venv: Path, args: argparse.Namespace, workdir: Path, start_timeout_s: float = 900,
                 setup: Setup = SETUPS[0]):
        self.folder = workdir / f"peer_{setup.name}"
        self.folder.mkdir()
        self.log_path = workdir / f"peer_server_{setup.name}.log"
        self._log = open(self.log_path, "w")
        self.n = 0
        cmd = [*setup.prefix, str(venv / "bin" / "python"), "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(WORKERS), str(WORKER_SCRIPT), "--serve", str(self.folder),
               "--owner-pid", str(os.getpid()), "--experts", str(args.experts), "--d-model", str(args.d_model),
               "--d-ff", str(args.d_ff), "--tokens", str(args.tokens),
               "--min-capacity", str(args.min_capacity)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", **dict(setup.torch_env)}
        env.pop("XLA_FLAGS", None)
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.ready = self._wait_for(self.folder / "ready.json", start_timeout_s)
        self.start_s = time.perf_counter() - start

    def _wait_for(self, path: Path, timeout_s: float) -> dict:
        deadline = time.perf_counter() + timeout_s
        while not path.exists():
            if self.proc.poll() is not None:
                self._log.flush()
                raise RuntimeError(f"the DeepSpeed peer stopped (exit status {self.proc.returncode}); its log "
                                   f"ends:\n{self.log_path.read_text()[-3000:]}")  # fmt: skip
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the DeepSpeed peer wrote no {path.name} in {timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def measure(self, case: Case, warmup: int, steps: int, timeout_s: float = 1800) -> dict:
        cmd = {"ep": case.expert, "k": case.top_k, "cf": case.capacity_factor, "warmup": warmup, "steps": steps}
        self._command(cmd)
        result = self._wait_for(self.folder / f"result_{self.n}.json", timeout_s)
        self.n += 1
        return result

    def _command(self, cmd: dict) -> None:
        tmp = self.folder / f"cmd_{self.n}.json.tmp"
        tmp.write_text(json.dumps(cmd))
        tmp.rename(self.folder / f"cmd_{self.n}.json")  # atomic: workers never read half a command

    def close(self) -> None:
        if self.proc.poll() is None:
            self._command({"stop": True})
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, cases: list[Case], workdir: Path, setup: Setup = SETUPS[0]) -> dict:
    """Alternate the two sides, round after round, in one setup; returns the raw measurements."""
    tedjax = TedjaxClient(args, workdir, setup)  # starts in the background
    import _common  # noqa: F401  (imports jax: done while the tedjax side starts)

    venv = peer_venv(args)
    peer_versions, peer_status, peer_help, peer = None, "", "", None
    raw = {c.name: {"tedjax": [], "peer": [], "load_1min": []} for c in cases}
    try:
        if args.quick:
            peer_status = "not measured: --quick runs the tedjax side only"
        else:
            peer_versions, why = check_peer(venv)
            if peer_versions is None:
                peer_help, peer_status = setup_help(venv, why), f"not measured: {why}"
                print(peer_help + "\nMeasuring the tedjax side only.", flush=True)
        print(f"[{setup.label}] tedjax side ready (jax {tedjax.ready['machine']['jax_version']}, "
              f"{tedjax.ready['machine']['device_count']} CPU devices)", flush=True)
        if not peer_status:
            print(f"starting the DeepSpeed-MoE peer ({WORKERS} torchrun workers from {venv}) ...", flush=True)
            peer = PeerServer(venv, args, workdir, setup=setup)
            print(f"peer ready in {peer.start_s:.0f} s (torch {peer.ready['torch_version']}, "
                  f"deepspeed {peer.ready['deepspeed_version']}, "
                  f"CPU capability {peer.ready.get('torch_cpu_capability')})", flush=True)
        for rnd in range(args.rounds):
            for case in cases:
                sides = ["tedjax", "peer"] if rnd % 2 == 0 else ["peer", "tedjax"]
                mine = raw[case.name]
                mine["load_1min"].append(_load1())
                for side in sides:
                    if side == "tedjax":
                        mine["tedjax"].append(tedjax.measure(case, args.warmup, args.steps))
                    elif peer is not None:
                        mine["peer"].append(peer.measure(case, args.warmup, args.steps))
                t = mine["tedjax"][-1]["tokens_per_s"]
                p = mine["peer"][-1]["tokens_per_s"] if peer is not None else None
                ratio = f"ratio {t / p:.2f}" if p else "peer not measured"
                print(f"  [{setup.name}] round {rnd + 1}/{args.rounds} {case.name}: tedjax {t:,.0f} tokens/s, "
                      f"DeepSpeed {f'{p:,.0f}' if p else '-'} tokens/s, {ratio}", flush=True)
    finally:
        tedjax.close()
        if peer is not None:
            peer.close()
    return {"raw": raw, "machine": tedjax.ready["machine"], "matmul_roof": tedjax.ready["matmul_roof"],
            "peer_status": peer_status or "measured",
            "setup": setup,
            "peer_help": peer_help,
            "peer_versions": ({**(peer_versions or {}), **(peer.ready if peer else {})} or None),
            "peer_venv": str(venv),
            "peer_start_s": peer.start_s if peer else None}  # fmt: skip


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def rows_for(cases: list[Case], measured: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for case in cases:
        mine = measured["raw"][case.name]
        ted, peer = mine["tedjax"], mine["peer"]
        ted_tps = [m["tokens_per_s"] for m in ted]
        peer_tps = [m["tokens_per_s"] for m in peer]
        ratios = [t / p for t, p in zip(ted_tps, peer_tps)]
        ratio = statistics.median(ratios) if ratios else None
        # tokens per CPU-second: all of tedjax's threads against the 8 DeepSpeed ranks' summed CPU time
        tokens = WORKERS * args.tokens
        ted_cpu_ms = statistics.median(statistics.median(m["cpu_s"]) for m in ted) * 1e3
        peer_cpu = [m["cpu_s_all_ranks"] for m in peer if "cpu_s_all_ranks" in m]
        peer_cpu_ms = statistics.median(statistics.median(c) for c in peer_cpu) * 1e3 if peer_cpu else None
        cpu_ratios = [statistics.median(c) / statistics.median(m["cpu_s"]) for m, c in zip(ted, peer_cpu)]
        # tedjax's step if it were nothing but its FLOPs at the bare-matmul rate: no code change gets below it
        floor_cpu_ms = ted[0]["gflop"] / measured["matmul_roof"]["harmonic_mean"] * 1e3
        setup = measured["setup"]
        rows.append({
            "setup": setup.name,
            "setup_label": setup.label,
            "case": case.name,
            "label": case.label,
            "top_k": case.top_k,
            "capacity_factor": case.capacity_factor,
            "tedjax_mesh": case.mesh,
            "deepspeed_ep": case.expert,
            "capacity": ted[0]["capacity"],
            "tedjax_tokens_per_s": statistics.median(ted_tps),
            "deepspeed_tokens_per_s": statistics.median(peer_tps) if peer_tps else None,
            "ratio": ratio,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "ratios_per_round": ratios,
            "target": (("PASS" if ratio >= TARGET_RATIO else "MISS") if ratio is not None else "NOT MEASURED"),
            "tedjax_tokens_per_s_per_round": ted_tps,
            "deepspeed_tokens_per_s_per_round": peer_tps,
            "tedjax_step_ms": statistics.median(m["median_step_s"] for m in ted) * 1e3,
            "deepspeed_step_ms": statistics.median(m["median_step_s"] for m in peer) * 1e3 if peer else None,
            "tedjax_times_s": [m["times_s"] for m in ted],
            "tedjax_cpu_s": [m["cpu_s"] for m in ted],
            "deepspeed_times_s": [m["times_s"] for m in peer],
            "deepspeed_cpu_s_rank0": [m["cpu_s_rank0"] for m in peer],
            "tedjax_compile_s": ted[0]["compile_s"],
            "tedjax_first_loss": ted[0]["first_loss"],
            "tedjax_dropped_fraction": ted[0]["dropped_fraction"],
            "deepspeed_loss_rank0": peer[0]["loss_rank0"] if peer else None,
            "load_1min_per_round": mine["load_1min"],
            "tedjax_cpu_ms_per_step": ted_cpu_ms,
            "deepspeed_cpu_ms_per_step": peer_cpu_ms,
            "tedjax_tokens_per_cpu_s": tokens / ted_cpu_ms * 1e3,
            "deepspeed_tokens_per_cpu_s": tokens / peer_cpu_ms * 1e3 if peer_cpu_ms else None,
            # median over rounds of (DeepSpeed CPU per step / tedjax CPU per step) = tokens per CPU-second ratio
            "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
            "tedjax_gflop_per_step": ted[0]["gflop"],
            "tedjax_floor_cpu_ms": floor_cpu_ms,
            "tedjax_of_matmul_roof": floor_cpu_ms / ted_cpu_ms,
            "cpu_ratio_ceiling": peer_cpu_ms / floor_cpu_ms if peer_cpu_ms else None,
            "cpu_ratios_per_round": cpu_ratios,
            "deepspeed_cpu_s_all_ranks": peer_cpu,
        })  # fmt: skip
    return rows


def render_markdown(rows: list[dict], settings: dict, machine: dict, measured: dict, wall_s: float,
                    runs: list[dict] | None = None) -> str:
    """The results table; `runs` (every setup's measurements, `measured` the first) adds a setup column."""
    import _common

    runs = runs or [measured]
    several = len(runs) > 1
    cols = [
        *([("setup", "setup")] if several else []),
        ("case", "label"),
        ("tedjax mesh (d,e,t)", "tedjax_mesh"),
        ("DeepSpeed ep", "deepspeed_ep"),
        ("C", "capacity"),
        ("tedjax tokens/s", "tedjax_tokens_per_s", ",.0f"),
        ("DeepSpeed tokens/s", "deepspeed_tokens_per_s", ",.0f"),
        ("tedjax / DeepSpeed (median of rounds)", "ratio", ".2f"),
        ("range over rounds", lambda r: f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if r["ratio"] else ""),
        (f"target >= {TARGET_RATIO}", lambda r: f"**{r['target']}**"),
        ("CPU ms/step tedjax / DeepSpeed (8 ranks)",
         lambda r: f"{r['tedjax_cpu_ms_per_step']:.0f} / {r['deepspeed_cpu_ms_per_step']:.0f}"
         if r.get("deepspeed_cpu_ms_per_step") else f"{r['tedjax_cpu_ms_per_step']:.0f} / -"),
        ("tokens per CPU-s ratio", lambda r: f"{r['cpu_ratio']:.2f}" if r.get("cpu_ratio") else ""),
        ("tedjax at % of bare matmul rate", lambda r: f"{r['tedjax_of_matmul_roof']:.0%}"),
        ("ceiling of the CPU ratio", lambda r: f"{r['cpu_ratio_ceiling']:.2f}" if r.get("cpu_ratio_ceiling") else ""),
        ("load (1 min) per round", lambda r: ", ".join(f"{v:g}" for v in r["load_1min_per_round"] if v is not None)),
    ]
    versions = measured["peer_versions"] or {}
    lines = [
        "# tedjax MoE layer vs DeepSpeed-MoE's, same CPU",
        "",
        (f"`{settings['command']}` "
        f"({settings['rounds']} round(s) x {settings['warmup']} warm-up + {settings['steps']} timed steps per side "
        f"and case; wall {wall_s:.0f} s). E={settings['experts']}, D={settings['d_model']}, "
        f"F={settings['d_ff']} GELU experts, {settings['tokens']} tokens per worker (one routing group), "
        f"{WORKERS} workers, min capacity {settings['min_capacity']}; step = forward + backward of "
        "mean(y^2) + 0.01 aux_loss, gradients w.r.t. the layer's parameters and input. "
        f"tokens/s = {WORKERS * settings['tokens']} / median step time, median over rounds; the ratio is the "
        "median of per-round ratios."),
        "",
        _common.markdown_table(rows, cols),
        f"DeepSpeed-MoE peer: {measured['peer_status']}"
        + (f" (torch {versions.get('torch_version')}, deepspeed {versions.get('deepspeed_version')}, "
           f"{WORKERS} torchrun processes x 1 thread, gloo)" if versions else "") + ".",
        *(["", "To measure the peer, make its environment once (outside the repository):", "",
           *[f"    {c}" for c in SETUP_COMMANDS]] if measured["peer_help"] else []),
        *([""] + [f"Setup {m['setup'].label}: tedjax {_common.cpu_line(m['machine'])}"
                  + (f" DeepSpeed: torch CPU capability {m['peer_versions'].get('torch_cpu_capability', '?')}, "
                     f"{m['peer_versions'].get('cpu_threads', '?')} CPU(s) per rank." if m["peer_versions"] else "")
                  for m in runs]
          if several or runs[0]["setup"].name != "default" else []),
        "",
        f"tedjax: jax {machine.get('jax_version')}, {machine.get('device_count')} simulated "
        f"{machine.get('backend')} devices in one process (glibc keeps freed memory, "
        f"`tedjax.host.reuse_freed_host_memory`: {machine.get('reuse_freed_host_memory')}). Machine: {machine.get('processor')}, "
        f"{machine.get('cpu_count')} CPUs, load average at start {machine.get('load_avg')}, "
        f"at end {settings.get('load_avg_end')}. Commit {machine.get('git_commit')}"
        + (f", with uncommitted changes in {', '.join(settings['tedjax_uncommitted'])}"
           if settings.get("tedjax_uncommitted") else "") + ".",
        "",
        ("Notes: DeepSpeed's step has no gradient all-reduce (its engine does that, outside the layer); "
        "tedjax's has the ones its sharding implies (router over 8 devices, experts over \"data\" at (2,4,1)). "
        "tedjax runs 8 simulated devices on XLA's thread pool, DeepSpeed 8 single-thread processes: both use "
        "every core. Other jobs share the machine, so absolute tokens/s move between runs; the ratio, taken "
        "from measurements seconds apart, moves less. CPU ms/step is the median over rounds of each measurement's "
        "median: tedjax's process (all threads), DeepSpeed's 8 ranks summed (barrier waits included); the "
        "tokens per CPU-second ratio is the median over rounds of DeepSpeed CPU / tedjax CPU per step. "
        "Ceiling: DeepSpeed's CPU per step over tedjax's FLOPs per step (XLA's cost analysis, all devices) at "
        "this CPU's bare float32 matmul rate for the expert shapes ("
        + ", ".join(f"{k} {v:.1f}" for k, v in measured["matmul_roof"].items() if k != "harmonic_mean")
        + f" GFLOP per CPU-second, harmonic mean {measured['matmul_roof']['harmonic_mean']:.1f}), i.e. the "
        "tokens per CPU-second ratio if tedjax's step were its matmuls alone at that rate; both sides do the "
        "same FLOPs (DeepSpeed 0.19.8 dispatches by index too). A target above the ceiling cannot be met on "
        "this CPU by any change to tedjax's code short of doing fewer FLOPs."),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], default=[c.name for c in CASES])
    p.add_argument("--setups", nargs="+", choices=[s.name for s in SETUPS], default=["default"],
                   help="how both sides run (stand-ins for other CPUs; see above), one after the other")
    p.add_argument("--rounds", type=int, default=5, help="rounds of (tedjax, DeepSpeed) measurements per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    p.add_argument("--peer-venv", default=None,
                   help=f"the peer's virtual environment (default ${PEER_VENV_ENV}, else {DEFAULT_PEER_VENV})")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024, help="expert FFN width (GELU)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per worker = one routing group")
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="tedjax side only, D=64, F=256, 256 tokens per worker, "
                   "2 steps (CI); writes to a temp dir unless --out")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/, temp dir for --quick)")
    p.add_argument("--serve-tedjax", action="store_true", help=argparse.SUPPRESS)  # internal: the tedjax side
    args = p.parse_args(argv)
    if args.quick:  # a smoke run: the three cases' programs at small widths, the compile dominates
        args.rounds, args.warmup, args.steps = 1, 0, 2
        args.d_model, args.d_ff, args.tokens = 64, 256, 256
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.experts < WORKERS or args.experts % WORKERS:
        p.error(f"--experts={args.experts} must be a multiple of {WORKERS} (expert parallel {WORKERS} in two cases)")
    for name in ("d_model", "d_ff", "tokens", "min_capacity"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _uncommitted(folder: str) -> list[str] | None:
    """Files under `folder` that differ from the recorded git commit (the code measured is not that commit's)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", folder], cwd=REPO, capture_output=True,
                             text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else None


def _shown_argv(argv) -> list[str]:
    """The command-line arguments as given, less --out (a path on one machine)."""
    argv, shown = list(sys.argv[1:] if argv is None else argv), []
    skip = False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        shown.append(a)
    return shown


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve_tedjax:
        serve_tedjax(args)
        return
    import _common

    cases = [CASES_BY_NAME[n] for n in args.cases]
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix=f"{NAME}_run_") as workdir:
        for name in args.setups:
            runs.append(run(args, cases, Path(workdir), SETUPS_BY_NAME[name]))
    wall_s = time.perf_counter() - start
    measured = runs[0]
    rows = [row for m in runs for row in rows_for(cases, m, args)]
    settings = {
        "command": " ".join(["python", "benchmarks/peer_deepspeed.py", *_shown_argv(argv)]),
        "quick": args.quick, "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps,
        "cases": args.cases, "setups": args.setups, "experts": args.experts, "d_model": args.d_model, "d_ff": args.d_ff,
        "tokens": args.tokens, "workers": WORKERS, "min_capacity": args.min_capacity, "target_ratio": TARGET_RATIO,
        "peer_venv": measured["peer_venv"], "peer_status": measured["peer_status"],
        "peer_versions": measured["peer_versions"], "peer_start_s": measured["peer_start_s"],
        "peer_setup": list(SETUP_COMMANDS) if measured["peer_help"] else None,
        "load_avg_end": _common.load_avg(),
        "tedjax_uncommitted": _uncommitted("tedjax"),
    }  # fmt: skip
    markdown = render_markdown(rows, settings, measured["machine"], measured, wall_s, runs)
    # a case's verdict under its own name in the default setup, as "<setup>:<case>" in the others
    verdicts = {(r["case"] if r["setup"] == "default" else f"{r['setup']}:{r['case']}"): r["target"] for r in rows}
    machines = {m["setup"].name: {**m["machine"], "peer": m["peer_versions"]} for m in runs}
    _common.publish(NAME, rows, settings, markdown, _common.output_dir(NAME, args.out, args.quick),
                    machine=measured["machine"],
                    extra={"verdicts": verdicts, "wall_s": wall_s, "machines_by_setup": machines})  # fmt: skip
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "peer not measured"
        where = "" if r["setup"] == "default" else f" [{r['setup']}]"
        print(f"{r['target']}: {r['case']}{where} ({r['label']}) tedjax / DeepSpeed {ratio}, "
              f"target >= {TARGET_RATIO}x")
    if measured["peer_help"]:
        print("\n" + measured["peer_help"])


if __name__ == "__main__":
    main()
