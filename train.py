"""Train a TED-sharded MoE language model.

    python train.py --config configs/tiny.yaml [key.sub=value ...] [--resume]

With no accelerator it runs on simulated CPU devices (8 unless --cpu-devices
says otherwise). On GPU hosts it runs unchanged; for several hosts pass
--coordinator/--num-processes/--process-id (or set the usual JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID / SLURM variables) and start one process per host.
"""

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML file from configs/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.top_k=2 steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir")
    parser.add_argument("--cpu-devices", type=int, default=8, help="simulated CPU devices when no accelerator (8)")
    parser.add_argument("--coordinator", help="host:port of process 0, for multi-process runs")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before jax is imported: the CPU platform gets --cpu-devices simulated devices
    # (harmless on GPU hosts, where the GPU stays the default backend).
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        ).strip()

    from tedjax.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.xla.flags():
        os.environ["XLA_FLAGS"] += " " + " ".join(config.xla.flags())

    import jax

    if args.coordinator or args.num_processes or "JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_JOB_ID" in os.environ:
        if args.coordinator and jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    from tedjax.checkpoint import CheckpointError
    from tedjax.loop import TrainingStopped, run

    try:
        result = run(config, resume=args.resume)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    if result.stopped_by_signal:
        print(f"stopped by signal; checkpoint step {result.last_checkpoint} saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
