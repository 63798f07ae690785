"""A run file as one labelled xarray Dataset (the optional `analysis` extra: xarray, h5netcdf)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .store import LINK_PORTS, plain, read_run


def open_run(path: str | Path) -> Any:
    """The run file at `path` (checked as read_run checks it) as an xarray.Dataset: every PE
    counter on dimensions (y, x), every link counter as `link_<name>` on (y, x, port), the
    /summary scalars as dimensionless variables, each with its units and description, and the
    root attributes as the Dataset's attributes. Files written before dimension scales existed
    open the same way."""
    import xarray as xr
    rf = read_run(path)
    H, W = rf.attrs["trace_mesh_height"], rf.attrs["trace_mesh_width"]
    with h5py.File(rf.path, "r") as f:
        meta = {f"{g}/{k}": {a: plain(d.attrs.get(a, "")) for a in ("units", "description")}
                for g in ("summary", "pe", "link") for k, d in f[g].items()}
    data: dict[str, Any] = {}
    for name, a in rf.pe.items():
        data[name] = (("y", "x"), a, meta.get(f"pe/{name}", {}))
    for name, a in rf.link.items():
        data[f"link_{name}"] = (("y", "x", "port"), a, meta.get(f"link/{name}", {}))
    for name, v in rf.summary.items():
        if name not in data:
            data[name] = ((), v, meta.get(f"summary/{name}", {}))
    coords = {"y": np.arange(H), "x": np.arange(W), "port": LINK_PORTS.split(",")}
    attrs = {k: (int(v) if isinstance(v, bool) else v) for k, v in rf.attrs.items()}
    return xr.Dataset(data, coords=coords, attrs=attrs)
