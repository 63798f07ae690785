"""The cycle engine: SoA state, Numba kernels, the driver, and the plain-Python reference."""
