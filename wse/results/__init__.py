"""Results: the HDF5 run file and its human-readable summary."""
