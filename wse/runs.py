"""Index arithmetic over runs laid end to end (counts[i] elements in run i), shared by the
builders, the engine's result tables and the functional results."""
from __future__ import annotations

import numpy as np


def positions(counts: np.ndarray) -> np.ndarray:
    """Each element's place in its run: 0 .. counts[i] - 1 for run i, run after run."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
