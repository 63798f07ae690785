"""The cycle engine: SoA state, Numba kernels, the driver, and the plain-Python reference."""

from . import jit_cache

# compiled kernels are cached per digest of their sources (jit_cache): before any is loaded
jit_cache.configure()

# Bump whenever a change alters the counters any trace yields (the stage cache keys on it,
# system/cache.py, besides a digest of the engine's and builders' source).
SEMANTIC_VERSION = 1
