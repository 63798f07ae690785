"""The cycle engine: SoA state, Numba kernels, the driver, and the plain-Python reference."""

# Bump whenever a change alters the counters any trace yields (the stage cache keys on it,
# system/cache.py, besides a digest of the engine's and builders' source).
SEMANTIC_VERSION = 1
