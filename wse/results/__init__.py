"""Results: the HDF5 run file and its human-readable summary; `open_run` gives a run file as a
labelled xarray Dataset (needs the `analysis` extra)."""


def open_run(path):  # noqa: ANN001, ANN201 (lazy: xarray is optional)
    """A run file as an xarray.Dataset (results/labelled.py)."""
    from .labelled import open_run as _open
    return _open(path)
