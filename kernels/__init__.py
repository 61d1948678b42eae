"""edgewise.kernels: Numba-JIT statistics and drift kernels (numpy and numba only)."""
