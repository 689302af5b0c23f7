"""tedjax: Tensor-Expert-Data parallel Mixture-of-Experts training in JAX."""

import sys

if "IPython" not in sys.modules and "flax.nnx" not in sys.modules:
    # flax.nnx imports all of IPython (~0.45 s of CPU, a fifth of train.py's start-up) only to call get_ipython(),
    # which is None in a process that has not imported IPython, so flax's colour choice comes out the same.
    sys.modules["IPython"] = None  # type: ignore[assignment]  (`import IPython` raises ImportError)
    try:
        import flax.nnx  # noqa: F401
    finally:
        del sys.modules["IPython"]

from tedjax import routing
from tedjax.config import ModelConfig, check_mesh
from tedjax.generation import generate
from tedjax.mesh import MESH_AXES, RULES, logical_to_spec, make_mesh, named_sharding, state_shardings
from tedjax.model import Transformer, init_model, loss_fn
from tedjax.moe import MoE, MoEStats
from tedjax.sharding import create_sharded, shard, simulate_cpu_devices, use_mesh
from tedjax.step import TrainStep, train_step_fn

__all__ = [
    "MESH_AXES", "RULES", "ModelConfig", "MoE", "MoEStats", "Transformer",
    "check_mesh", "init_model", "logical_to_spec", "loss_fn", "make_mesh", "named_sharding", "routing",
    "state_shardings",
    "TrainStep", "create_sharded", "shard", "simulate_cpu_devices", "train_step_fn", "use_mesh",
    "generate", "hf",
]  # fmt: skip
__version__ = "0.1.0"

# Submodules loaded on first use (`tedjax.loop` pulls in orbax), so `import tedjax` stays light
# and every name in the README's API table works after a plain `import tedjax`.
_LAZY_SUBMODULES = ("analysis", "balance", "checkpoint", "config", "data", "hf", "host", "linen", "logs", "loop",
                    "optim", "pipeline", "plan", "trainer")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"tedjax.{name}")
    raise AttributeError(f"module 'tedjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
