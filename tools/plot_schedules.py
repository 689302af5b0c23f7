"""Plot the learning-rate schedules of `optimizer.schedule` to docs/schedules.png (the README's figure).

    python tools/plot_schedules.py [--out docs/schedules.png]

The curves are `tedjax.optim.learning_rate_schedule` itself, for configs/tiny.yaml's optimizer settings
(learning_rate 3e-3, min_lr_ratio 0.1, 30 warmup steps, 300 steps; wsd with decay_fraction 0.2).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tedjax.config import SCHEDULES, load_config  # noqa: E402
from tedjax.optim import learning_rate_schedule  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "schedules.png"))
    args = parser.parse_args(argv)
    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    steps = np.arange(config.steps + 1)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for name in SCHEDULES:
        schedule = learning_rate_schedule(dataclasses.replace(config.optimizer, schedule=name), config.steps)
        ax.plot(steps, [float(schedule(s)) for s in steps], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("optimizer.schedule, configs/tiny.yaml settings")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
