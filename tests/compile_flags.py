"""XLA flags that make the tests' compilations fast (imported by conftest.py before jax, and by tests that
start a subprocess with XLA_FLAGS of its own).

Tests check what is compiled, not how fast the kernels run: tiny models compile far faster without LLVM's
expensive passes, and XLA:CPU's elemental fusion emitters compile a program in about a third of the CPU time of
its MLIR fusion emitters. Neither changes the HLO, its collectives, the buffer sizes or the results.
"""

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
