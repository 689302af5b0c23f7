"""tedjax: Tensor-Expert-Data parallel Mixture-of-Experts training in JAX."""

from tedjax import routing
from tedjax.config import ModelConfig, check_mesh
from tedjax.mesh import MESH_AXES, RULES, logical_to_spec, make_mesh, named_sharding, state_shardings
from tedjax.model import Transformer, init_model, loss_fn
from tedjax.moe import MoE, MoEStats

__all__ = [
    "MESH_AXES", "RULES", "ModelConfig", "MoE", "MoEStats", "Transformer",
    "check_mesh", "init_model", "logical_to_spec", "loss_fn", "make_mesh", "named_sharding", "routing",
    "state_shardings",
]  # fmt: skip
__version__ = "0.1.0"
