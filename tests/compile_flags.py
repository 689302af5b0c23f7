"""XLA flags that make the tests' compilations fast (imported by conftest.py before jax, and by tests that
start a subprocess with XLA_FLAGS of its own).

Tests check what is compiled, not how fast the kernels run: tiny models compile far faster without LLVM's
expensive passes, and XLA:CPU's elemental fusion emitters compile a program in about a third of the CPU time of
its MLIR fusion emitters. One LLVM module per program instead of XLA's split for parallel codegen: with two
test workers on two cores there is no idle core to compile the parts on, and the split's extra modules cost
~17% of a compile-bound file's CPU (tests/test_zero.py alone: 67 s -> 55-61 s user, 2026-12-07). None of these
changes the HLO, its collectives, the buffer sizes or the results.
"""

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                      " --xla_cpu_parallel_codegen_split_count=1")
