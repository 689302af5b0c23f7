"""Train a TED-sharded MoE language model.

    python train.py --config configs/tiny.yaml [key.sub=value ...] [--resume]
    python train.py --config configs/gpu_2.7b.yaml --dry-run --cpu-devices 64   # check a plan, no training
    python train.py --config configs/gpu_6.7b.yaml --dry-run --cluster configs/clusters/h200.yaml

With no accelerator it runs on simulated CPU devices (8 unless --cpu-devices
says otherwise). On GPU hosts it runs unchanged; for several hosts start one process per host with
--coordinator/--num-processes/--process-id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or launch it with `srun` under SLURM. See docs/multihost.md.
"""

import argparse
import os
import re
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML file from configs/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.top_k=2 steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir")
    parser.add_argument("--allow-change", default="", metavar="KEY,KEY",
                        help="with --resume: accept these config changes although they change results "
                             "(e.g. optimizer.learning_rate,seed); the run records them")
    parser.add_argument("--cpu-devices", type=int, help="simulated CPU devices per process when no accelerator (8); "
                        "with --dry-run, as many as the GPUs to check a plan for (no fixed limit: 1024 compile the "
                        "tiny config in under a minute; time and host memory grow with N and the model)")
    parser.add_argument("--dry-run", action="store_true", help="compile the step and print its per-device memory and "
                        "collectives beside the planner's prediction; no training, nothing written")
    parser.add_argument("--cluster", help="cluster preset (configs/clusters/*.yaml) that --dry-run and mesh=auto plan "
                        "for (default: the GPUs present; DGX-H100 for simulated CPU devices)")
    env = os.environ.get
    parser.add_argument("--coordinator", default=env("JAX_COORDINATOR_ADDRESS"),
                        help="host:port of process 0, for multi-process runs ($JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, default=env("JAX_NUM_PROCESSES"),
                        help="processes in the run ($JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, default=env("JAX_PROCESS_ID"),
                        help="this process, 0 .. num_processes - 1 ($JAX_PROCESS_ID)")
    # Overrides may come before, between or after the flags; type=int also converts the $JAX_* defaults.
    return parser.parse_intermixed_args(argv)


def _multi_process(args) -> bool:
    """Whether to call jax.distributed.initialize; raises ValueError on a half-given setup."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.num_processes == 1 and args.process_id in (None, 0):
        return False
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("a multi-process run needs all of --coordinator HOST:PORT, --num-processes N and "
                             "--process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); got "
                             f"coordinator={args.coordinator}, num_processes={args.num_processes}, "
                             f"process_id={args.process_id}")
        return args.num_processes > 1
    # Inside `srun` with several tasks JAX reads everything from SLURM's variables.
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        multi_process = _multi_process(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.cpu_devices is not None and args.cpu_devices < 1:
        print(f"error: --cpu-devices must be >= 1, got {args.cpu_devices}", file=sys.stderr)
        return 2
    # Before jax is imported: the CPU platform gets --cpu-devices simulated devices
    # (harmless on GPU hosts, where the GPU stays the default backend).
    preset = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if preset is None:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices or 8}"
        ).strip()
    elif args.cpu_devices is not None and int(preset.group(1)) != args.cpu_devices:
        print(f"error: --cpu-devices {args.cpu_devices} conflicts with XLA_FLAGS, which already sets "
              f"--xla_force_host_platform_device_count={preset.group(1)}; drop one of them", file=sys.stderr)
        return 2

    from tedjax.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.xla.flags():
        os.environ["XLA_FLAGS"] += " " + " ".join(config.xla.flags())

    import jax

    if multi_process:
        # Cross-process collectives on CPU devices (gloo is jax 0.10's default; explicit here).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    if args.dry_run or args.cluster:
        from tedjax import plan

        try:
            cluster = plan.Cluster.load(args.cluster) if args.cluster else None
            if args.dry_run:
                plan.dry_run(config, cluster=cluster)
                return 0
            if config.mesh.auto:  # refuses (NoPlanFits) when no plan fits the cluster's GPUs
                config = plan.auto_config(config, cluster=cluster)
            else:
                warning = plan.memory_warning(plan.memory(config), cluster.with_devices(jax.device_count()))
                if warning:
                    print(f"warning: {warning}", file=sys.stderr)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    from tedjax.checkpoint import CheckpointError
    from tedjax.host import reuse_freed_host_memory
    from tedjax.loop import TrainingStopped, run

    if jax.default_backend() == "cpu":
        reuse_freed_host_memory()  # XLA:CPU's per-step temporaries stop page-faulting (tedjax/host.py)

    try:
        if args.allow_change and not args.resume:
            raise ValueError("--allow-change only applies with --resume")
        result = run(config, resume=args.resume, allow_change=args.allow_change.split(","), config_file=args.config)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    if result.stopped_by_signal:
        print(f"stopped by signal; checkpoint step {result.last_checkpoint} saved")
        return 0
    from tedjax.generation import sample_after_training

    sample = sample_after_training(result)  # every process takes part (SPMD); process 0 prints
    if sample is not None and jax.process_index() == 0:
        print(f"sample: {sample!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
