"""Peer side of benchmarks/peer_deepspeed.py: DeepSpeed-MoE's MoE layer, forward + backward, on CPU workers.

Runs under torchrun in the peer's own virtual environment (torch + deepspeed,
never tedjax's dependencies), one process per worker, 1 thread each, over
gloo. Each step is DeepSpeed-MoE 0.19.8's `deepspeed.moe.layer.MoE` on
`[1, tokens, D]` per worker (one routing group per worker), then the backward
of `mean(out**2) + 0.01 * l_aux` (gradients w.r.t. the layer's parameters and
the input), timed between two barriers, as in DeepSpeed's own examples of the
layer. The expert-parallel process groups are made the way DeepSpeed's engine
makes them (`set_deepspeed_parallelism`), so `--ep 4` exchanges tokens within
groups of 4 workers. No optimizer step and no gradient all-reduce: that is
the engine's job, outside the layer.

One measurement per start (prints one JSON line on rank 0):

    ~/ds-venv/bin/torchrun --nproc_per_node 8 benchmarks/peer_deepspeed_worker.py --ep 8 --k 1 --cf 1.0

As a server for benchmarks/peer_deepspeed.py (`--serve DIR`): the workers
start once (importing deepspeed in 8 processes takes about a minute), then
run the measurements asked for in DIR/cmd_<n>.json, writing
DIR/result_<n>.json (rank 0), until DIR/cmd_<n>.json says {"stop": true} or
the process `--owner-pid` is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

POLL_S = 0.05  # how often an idle server looks for the next command (no CPU to speak of)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=8, help="expert-parallel size (divides the world size)")
    p.add_argument("--experts", type=int, default=8)
    # no option may be a prefix of a torchrun option ("--d" would be taken for torchrun's "--duplicate-...")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024, help="expert FFN width (GELU)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per worker (one routing group)")
    p.add_argument("--k", type=int, default=1, help="top-k")
    p.add_argument("--cf", type=float, default=1.0, help="capacity factor")
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--serve", default=None, help="serve measurements asked for in this directory")
    p.add_argument("--owner-pid", type=int, default=0, help="with --serve: exit when this process is gone")
    return p.parse_args(argv)


class Layer:
    """One DeepSpeed-MoE layer and its input, built identically on every rank."""

    def __init__(self, ep: int, k: int, cf: float, experts: int, d: int, f: int, tokens: int, min_capacity: int):
        from deepspeed.moe.layer import MoE

        torch.manual_seed(0)
        expert = torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.GELU(), torch.nn.Linear(f, d))
        self.moe = MoE(hidden_size=d, expert=expert, num_experts=experts, ep_size=ep, k=k,
                       capacity_factor=cf, eval_capacity_factor=cf, min_capacity=min_capacity, drop_tokens=True,
                       use_rts=False, top2_2nd_expert_sampling=False)  # fmt: skip
        # what deepspeed.initialize does for MoE modules: expert groups of `ep` consecutive ranks
        self.moe.set_deepspeed_parallelism()
        self.x = torch.randn(1, tokens, d, requires_grad=True)
        self.tokens = tokens

    def step(self) -> tuple[float, float, float]:
        """One timed forward + backward: (wall seconds, this process's CPU seconds, loss)."""
        self.moe.zero_grad(set_to_none=True)
        self.x.grad = None
        dist.barrier()
        cpu, start = time.process_time(), time.perf_counter()
        out, l_aux, _ = self.moe(self.x)
        loss = (out**2).mean() + 0.01 * l_aux
        loss.backward()
        dist.barrier()
        return time.perf_counter() - start, time.process_time() - cpu, float(loss.detach())

    def measure(self, warmup: int, steps: int) -> dict:
        for _ in range(warmup):
            self.step()
        walls, cpus, losses = zip(*(self.step() for _ in range(steps)))
        med = statistics.median(walls)
        world = dist.get_world_size()
        # every rank's CPU seconds per step, summed (after the timed steps): the peer's whole CPU cost
        cpu_all = torch.tensor(cpus, dtype=torch.float64)
        dist.all_reduce(cpu_all)
        return {
            "peer": "deepspeed-moe",
            "world": world,
            "ep": self.moe.ep_size,
            "median_step_s": med,
            "tokens_per_s": self.tokens * world / med,
            "times_s": list(walls),
            "cpu_s_rank0": list(cpus),
            "cpu_s_all_ranks": cpu_all.tolist(),
            "loss_rank0": losses[0],
        }


def versions() -> dict:
    import deepspeed

    return {"torch_version": torch.__version__, "deepspeed_version": deepspeed.__version__,
            "torch_threads": torch.get_num_threads(),
            # the ISA torch's kernels dispatch to (ATEN_CPU_CAPABILITY caps it) and the CPUs this rank may use
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_threads": len(os.sched_getaffinity(0))}  # fmt: skip


def serve(args: argparse.Namespace) -> None:
    """Run the measurements asked for in `args.serve`, in order, until told to stop."""
    folder, layers, n = Path(args.serve), {}, 0
    rank = dist.get_rank()
    if rank == 0:
        (folder / "ready.json").write_text(json.dumps({"world": dist.get_world_size(), **versions()}))
    while True:
        cmd_path = folder / f"cmd_{n}.json"
        while not cmd_path.exists():
            if args.owner_pid and not _alive(args.owner_pid):
                return
            time.sleep(POLL_S)
        cmd = _read_json(cmd_path)
        if cmd.get("stop"):
            return
        key = (cmd["ep"], cmd["k"], cmd["cf"])
        if key not in layers:  # every rank builds the same layers in the same order (new process groups)
            layers[key] = Layer(cmd["ep"], cmd["k"], cmd["cf"], args.experts, args.d_model, args.d_ff, args.tokens,
                                args.min_capacity)
        result = layers[key].measure(cmd["warmup"], cmd["steps"])
        if rank == 0:
            tmp = folder / f"result_{n}.json.tmp"
            tmp.write_text(json.dumps({**result, "k": cmd["k"], "cf": cmd["cf"]}))
            tmp.rename(folder / f"result_{n}.json")  # atomic: the reader never sees half a file
        n += 1


def _read_json(path: Path) -> dict:
    for _ in range(100):  # the writer renames a finished file into place; retry a torn read anyway
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            time.sleep(POLL_S)
    raise RuntimeError(f"{path} is not valid JSON")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        if args.serve:
            serve(args)
        else:
            layer = Layer(args.ep, args.k, args.cf, args.experts, args.d_model, args.d_ff, args.tokens, args.min_capacity)
            result = layer.measure(args.warmup, args.steps)
            if dist.get_rank() == 0:
                print(json.dumps({**result, "k": args.k, "cf": args.cf, **versions()}), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
