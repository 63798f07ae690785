"""Traces: per-PE programs plus static color routes, their structure and their HDF5 form.

A trace is what the engine executes. Programs are deduplicated: the op table holds each distinct
program once and `pe_program[y, x, thread]` names the program a PE's microthread runs (-1: none).
Routes are a columnar table of (pe, color, rx port, tx port mask). docs/trace-format.md is the
normative description of the file; trace_check.py checks a trace against a wafer.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from array import array
from pathlib import Path
from typing import Iterable, NamedTuple

import h5py
import numpy as np

from . import isa
from . import tensors as tensors_mod
from .errors import TraceError
from .tensors import TensorRecorder, TensorTable

FORMAT_NAME = "wse-trace"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 files have no op tags

OP_COLUMNS = (
    ("opcode", np.int8), ("kind", np.int8), ("dtype", np.int8), ("color_in", np.int8),
    ("color_out", np.int8), ("sem", np.int8), ("length", np.int32), ("dst", np.int32),
    ("src0", np.int32), ("src1", np.int32), ("tag", np.int32),
)
ROUTE_COLUMNS = (("pe", np.int32), ("color", np.int8), ("rx", np.int8), ("tx", np.uint8))


class Tag(NamedTuple):
    """A workload-level op (e.g. "layer 3 qkv"): results are attributed to these."""

    name: str
    layer: int = -1
    kind: str = ""


UNTAGGED = Tag("untagged", -1, "")


class Op(NamedTuple):
    """One instruction of a microthread program. Addresses are SRAM byte offsets."""

    opcode: int
    kind: int = isa.KIND_NONE
    dtype: int = isa.DTYPE_FP16
    color_in: int = isa.NO_COLOR
    color_out: int = isa.NO_COLOR
    sem: int = 0
    length: int = 0
    dst: int = 0
    src0: int = 0
    src1: int = 0
    tag: int = 0  # index into Trace.tags: the workload-level op this belongs to (0: none)

    def describe(self) -> str:
        name = isa.OPCODE_NAMES[self.opcode] if 0 <= self.opcode < isa.N_OPCODES else f"opcode {self.opcode}"
        if self.opcode == isa.OP_COMPUTE or self.opcode in (isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND):
            if 0 <= self.kind < isa.N_KINDS:
                name += f" {isa.KIND_NAMES[self.kind]}"
        return name


_NEW_TUPLE = tuple.__new__


def with_tag(op: Op, tag: int) -> Op:
    """op labelled with a workload-level tag (op._replace(tag=tag), without its per-call cost:
    builders relabel hundreds of thousands of ops)."""
    return _NEW_TUPLE(Op, op[:10] + (tag,))


def compute(kind: int, length: int, dst: int, src0: int, src1: int = 0,
            dtype: int = isa.DTYPE_FP16, tag: int = 0) -> Op:
    """Vector op over local SRAM (see isa.op_streams for which operands it reads)."""
    return Op(isa.OP_COMPUTE, kind, dtype, length=length, dst=dst, src0=src0, src1=src1, tag=tag)


def fill(length: int, dst: int, scalar: int, dtype: int = isa.DTYPE_FP16, tag: int = 0) -> Op:
    """Write the scalar at SRAM `scalar` to `length` elements at `dst` (no source stream; src0
    is set to dst so that every address the op names lies in its destination)."""
    return Op(isa.OP_COMPUTE, isa.KIND_FILL, dtype, length=length, dst=dst, src0=dst, src1=scalar, tag=tag)


def send(color: int, length: int, src: int, dtype: int = isa.DTYPE_FP16) -> Op:
    """Send `length` elements from SRAM at `src`, one per wavelet, on `color`."""
    return Op(isa.OP_SEND, dtype=dtype, color_out=color, length=length, src0=src)


def recv(color: int, length: int, dst: int, dtype: int = isa.DTYPE_FP16) -> Op:
    """Receive `length` wavelets on `color` into SRAM at `dst`."""
    return Op(isa.OP_RECV, dtype=dtype, color_in=color, length=length, dst=dst)


def recv_compute(color: int, kind: int, length: int, dst: int, src0: int = 0,
                 dtype: int = isa.DTYPE_FP16) -> Op:
    """dst <- kind(SRAM operand, wavelet) per element, e.g. the last stage of a reduction."""
    return Op(isa.OP_RECV_COMPUTE, kind, dtype, color_in=color, length=length, dst=dst, src0=src0)


def recv_compute_send(color_in: int, color_out: int, kind: int, length: int, src0: int = 0,
                      dtype: int = isa.DTYPE_FP16) -> Op:
    """Forward kind(SRAM operand, wavelet) on color_out: one stage of a pipelined chain.

    For FMAC the SRAM operand is the accumulator, addressed by src0 here (stored as dst).
    """
    dst = src0 if kind == isa.KIND_FMAC else 0
    return Op(isa.OP_RECV_COMPUTE_SEND, kind, dtype, color_in=color_in, color_out=color_out,
              length=length, dst=dst, src0=src0)


@functools.cache
def signal(sem: int) -> Op:
    return Op(isa.OP_SIGNAL, sem=sem)


@functools.cache
def wait(sem: int) -> Op:
    return Op(isa.OP_WAIT, sem=sem)


@dataclasses.dataclass
class Trace:
    """A complete trace: mesh size, routes, deduplicated programs and their assignment."""

    mesh_width: int
    mesh_height: int
    routes: dict[str, np.ndarray]  # columns of ROUTE_COLUMNS
    ops: dict[str, np.ndarray]  # columns of OP_COLUMNS
    prog_start: np.ndarray  # int32 [n_programs]
    prog_len: np.ndarray  # int32 [n_programs]
    pe_program: np.ndarray  # int32 [H, W, T], -1 = no program
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: list[Tag] = dataclasses.field(default_factory=lambda: [UNTAGGED])
    tensors: TensorTable | None = None  # where tensors live (/tensors; functional runs need it)

    @property
    def threads(self) -> int:
        return int(self.pe_program.shape[2])

    @property
    def n_pes(self) -> int:
        return self.mesh_width * self.mesh_height

    def op(self, i: int) -> Op:
        return Op(*(int(self.ops[name][i]) for name, _ in OP_COLUMNS))

    def program(self, pid: int) -> list[Op]:
        s = int(self.prog_start[pid])
        return [self.op(i) for i in range(s, s + int(self.prog_len[pid]))]

    def content_hash(self) -> str:
        """sha256 over the mesh size and every array: identifies the trace a run used."""
        h = hashlib.sha256(f"{self.mesh_width}x{self.mesh_height}".encode())
        for name, _ in ROUTE_COLUMNS:
            h.update(np.ascontiguousarray(self.routes[name]).tobytes())
        for name, _ in OP_COLUMNS:
            h.update(np.ascontiguousarray(self.ops[name]).tobytes())
        for a in (self.prog_start, self.prog_len, self.pe_program):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps([list(t) for t in self.tags]).encode())
        for b in self.tensors.digest_arrays() if self.tensors else ():
            h.update(b)
        return h.hexdigest()

    def pe_xy(self, pe: int) -> tuple[int, int]:
        return pe % self.mesh_width, pe // self.mesh_width

    def first_user(self, pid: int) -> tuple[int, int, int]:
        """(x, y, thread) of the first PE thread running program pid, for error messages."""
        y, x, t = (int(v[0]) for v in np.nonzero(self.pe_program == pid))
        return x, y, t

    # ---- I/O ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the trace; the file appears only when complete (write, then rename)."""
        from .files import replacing
        path = Path(path)
        comp = dict(compression="gzip", shuffle=True)
        with replacing(path, TraceError, "trace") as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = FORMAT_NAME
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["mesh_width"] = self.mesh_width
                f.attrs["mesh_height"] = self.mesh_height
                f.attrs["meta"] = json.dumps(self.meta, sort_keys=True)
                g = f.create_group("routes")
                for name, dt in ROUTE_COLUMNS:
                    g.create_dataset(name, data=self.routes[name].astype(dt), **_chunked(comp, len(self.routes[name])))
                g = f.create_group("ops")
                for name, dt in OP_COLUMNS:
                    g.create_dataset(name, data=self.ops[name].astype(dt), **_chunked(comp, len(self.ops[name])))
                g = f.create_group("programs")
                g.create_dataset("start", data=self.prog_start.astype(np.int32))
                g.create_dataset("length", data=self.prog_len.astype(np.int32))
                f.create_dataset("pe_program", data=self.pe_program.astype(np.int32), **comp)
                g = f.create_group("tags")
                g.create_dataset("name", data=np.array([t.name for t in self.tags], dtype=h5py.string_dtype()))
                g.create_dataset("layer", data=np.array([t.layer for t in self.tags], dtype=np.int32))
                g.create_dataset("kind", data=np.array([t.kind for t in self.tags], dtype=h5py.string_dtype()))
                if self.tensors is not None:
                    tensors_mod.save(f, self.tensors)


def _chunked(comp: dict, n: int) -> dict:
    return comp if n > 0 else {}


def load(path: str | Path) -> Trace:
    """Read and structurally check a trace file; errors name the file and dataset."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such trace file")
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: trace file is empty")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise TraceError(f"{path}: not a readable HDF5 trace file (truncated or corrupt?)") from None
    try:
        with f:
            return _read(f, path)
    except TraceError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise TraceError(f"{path}: corrupt trace file ({type(e).__name__}: {e})") from None


def _read(f: h5py.File, path: Path) -> Trace:
    if f.attrs.get("format") != FORMAT_NAME:
        raise TraceError(f"{path}: not a wse trace file (attribute 'format' is not {FORMAT_NAME!r})")
    version = int(f.attrs.get("format_version", -1))
    if version not in READABLE_VERSIONS:
        raise TraceError(f"{path}: trace format_version {version} is not supported "
                         f"(readable: {', '.join(map(str, READABLE_VERSIONS))})")

    def ds(name: str, dt) -> np.ndarray:
        if name not in f:
            raise TraceError(f"{path}: missing dataset /{name}")
        obj = f[name]
        if not isinstance(obj, h5py.Dataset):
            raise TraceError(f"{path}: /{name} is not a dataset")
        a = obj[()]
        if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.integer):
            raise TraceError(f"{path}: /{name} must be an integer array")
        out = a.astype(dt)
        if not np.array_equal(out, a):
            raise TraceError(f"{path}: /{name} has values that do not fit {np.dtype(dt).name}")
        return out

    def whole(name: str) -> int:
        v = f.attrs.get(name)
        if v is None:
            raise TraceError(f"{path}: attribute {name} is missing")
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            return int(v)
        if isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer():
            return int(v)
        shown = v.item() if isinstance(v, np.generic) else v
        raise TraceError(f"{path}: attribute {name} = {shown!r} is not a whole number")

    w, h = whole("mesh_width"), whole("mesh_height")
    meta_raw = f.attrs.get("meta", "{}")
    try:
        meta = json.loads(meta_raw)
    except (TypeError, ValueError):
        raise TraceError(f"{path}: attribute 'meta' is not JSON") from None
    routes = {name: ds(f"routes/{name}", dt) for name, dt in ROUTE_COLUMNS}
    ops = {name: ds(f"ops/{name}", dt) for name, dt in OP_COLUMNS if name != "tag" or version >= 2}
    if version < 2:
        ops["tag"] = np.zeros(len(ops["opcode"]), dtype=np.int32)
    tags = [UNTAGGED]
    if version >= 2:
        if "tags" not in f or not all(k in f["tags"] for k in ("name", "layer", "kind")):
            raise TraceError(f"{path}: missing the /tags table (name, layer, kind)")
        g = f["tags"]
        names, kinds = g["name"][()], g["kind"][()]
        layers = g["layer"][()]
        if not (len(names) == len(kinds) == len(layers) >= 1):
            raise TraceError(f"{path}: /tags columns differ in length or are empty")
        tags = [Tag(_str(n), int(l), _str(k)) for n, l, k in zip(names, layers, kinds)]
    trace = Trace(
        mesh_width=w, mesh_height=h, routes=routes, ops=ops,
        prog_start=ds("programs/start", np.int32), prog_len=ds("programs/length", np.int32),
        pe_program=ds("pe_program", np.int32), meta=meta, tags=tags,
        tensors=tensors_mod.load(f, str(path), w * h),
    )
    check_structure(trace, str(path))
    return trace


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def check_structure(t: Trace, where: str) -> None:
    """Checks that need no wafer configuration: shapes, enumerations, program references."""
    if not (1 <= t.mesh_width <= 4096 and 1 <= t.mesh_height <= 4096):
        raise TraceError(f"{where}: mesh {t.mesh_width}x{t.mesh_height} is out of range")
    for cols, table in ((ROUTE_COLUMNS, t.routes), (OP_COLUMNS, t.ops)):
        lens = {len(table[name]) for name, _ in cols}
        if len(lens) > 1 or any(table[name].ndim != 1 for name, _ in cols):
            raise TraceError(f"{where}: columns of one table have different lengths")
    if t.pe_program.ndim != 3 or t.pe_program.shape[:2] != (t.mesh_height, t.mesh_width):
        raise TraceError(f"{where}: pe_program must have shape ({t.mesh_height}, {t.mesh_width}, threads), "
                         f"got {t.pe_program.shape}")
    if t.pe_program.shape[2] < 1:
        raise TraceError(f"{where}: pe_program has no thread axis")
    n_ops, n_prog = len(t.ops["opcode"]), len(t.prog_start)
    if len(t.prog_len) != n_prog:
        raise TraceError(f"{where}: programs/start and programs/length differ in length")
    bad = np.nonzero((t.prog_start < 0) | (t.prog_len < 1) | (t.prog_start + t.prog_len > n_ops))[0]
    if len(bad):
        raise TraceError(f"{where}: program {bad[0]} refers to ops outside the op table (or is empty)")
    pp = t.pe_program
    if pp.size and (pp.min() < -1 or pp.max() >= n_prog):
        y, x, th = (int(v[0]) for v in np.nonzero((pp < -1) | (pp >= n_prog)))
        raise TraceError(f"{where}: PE ({x}, {y}) thread {th}: program id {pp[y, x, th]} does not exist")
    r = t.routes
    bad = np.nonzero((r["pe"] < 0) | (r["pe"] >= t.n_pes))[0]
    if len(bad):
        raise TraceError(f"{where}: route {bad[0]}: PE index {r['pe'][bad[0]]} is outside the mesh")
    bad = np.nonzero((r["rx"] < 0) | (r["rx"] >= isa.N_PORTS) | (r["tx"] == 0) | (r["tx"] >= 1 << isa.N_PORTS))[0]
    if len(bad):
        i = bad[0]
        x, y = t.pe_xy(int(r["pe"][i]))
        raise TraceError(f"{where}: PE ({x}, {y}) color {r['color'][i]}: route has bad rx port "
                         f"{r['rx'][i]} or empty/bad tx mask {r['tx'][i]}")
    bad = np.nonzero(_bad_ops(t))[0]
    if len(bad):  # the first bad op, with the first thing wrong with it
        i = int(bad[0])
        o = t.ops
        code, kind, dtype = int(o["opcode"][i]), int(o["kind"][i]), int(o["dtype"][i])
        if not 0 <= code < isa.N_OPCODES:
            msg = f"unknown opcode {code}"
        elif not 0 <= kind < isa.N_KINDS:
            msg = f"unknown compute kind {kind}"
        elif not 0 <= dtype < isa.N_DTYPES:
            msg = f"unknown dtype {dtype}"
        elif code in (isa.OP_COMPUTE, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND) and kind == isa.KIND_NONE:
            msg = "compute op without a kind"
        elif code in (isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND) and kind >= isa.FIRST_COMPUTE_ONLY_KIND:
            msg = f"a {isa.KIND_NAMES[kind]} op cannot take a wavelet (only compute ops have that kind)"
        elif code not in (isa.OP_SIGNAL, isa.OP_WAIT) and o["length"][i] < 1:
            msg = f"length {o['length'][i]} must be at least 1"
        elif not 0 <= o["tag"][i] < len(t.tags):
            msg = f"tag {o['tag'][i]} is not in the /tags table ({len(t.tags)} tags)"
        else:
            msg = f"semaphore {o['sem'][i]} out of range [0, {isa.MAX_SEMAPHORES})"
        raise TraceError(f"{where}: {op_location(t, i)}: {msg}")


def _bad_ops(t: Trace) -> np.ndarray:
    """Per op: whether any structural check fails (check_structure names the first reason)."""
    o = t.ops
    code, kind, dtype = (o[k].astype(np.int64) for k in ("opcode", "kind", "dtype"))
    sync = (code == isa.OP_SIGNAL) | (code == isa.OP_WAIT)
    computes = (code == isa.OP_COMPUTE) | (code == isa.OP_RECV_COMPUTE) | (code == isa.OP_RECV_COMPUTE_SEND)
    tag, sem = o["tag"].astype(np.int64), o["sem"].astype(np.int64)
    return ((code < 0) | (code >= isa.N_OPCODES) | (kind < 0) | (kind >= isa.N_KINDS) | (dtype < 0)
            | (dtype >= isa.N_DTYPES) | (computes & (kind == isa.KIND_NONE)) | (~sync & (o["length"] < 1))
            | (computes & (code != isa.OP_COMPUTE) & (kind >= isa.FIRST_COMPUTE_ONLY_KIND))
            | (tag < 0) | (tag >= len(t.tags)) | (sync & ((sem < 0) | (sem >= isa.MAX_SEMAPHORES))))


def op_location(t: Trace, op_index: int) -> str:
    """'PE (x, y) thread t op k (name)' for the first PE whose program contains op_index."""
    pids = np.nonzero((t.prog_start <= op_index) & (op_index < t.prog_start + t.prog_len))[0]
    desc = t.op(op_index).describe()
    for pid in pids:
        if np.any(t.pe_program == pid):
            x, y, th = t.first_user(int(pid))
            return f"PE ({x}, {y}) thread {th} op {op_index - int(t.prog_start[pid])} ({desc})"
    return f"op {op_index} ({desc}, in no PE's program)"


def _column(what: str, values, dt) -> np.ndarray:
    """values as a column of dtype dt; TraceError if any value does not fit the file format."""
    a = np.asarray(values, dtype=object if len(values) == 0 else None)
    if a.size == 0:
        return np.zeros(0, dtype=dt)
    info = np.iinfo(dt)
    lo, hi = int(np.min(a)), int(np.max(a))
    if lo < info.min or hi > info.max:
        bad = lo if lo < info.min else hi
        raise TraceError(f"{what} = {bad} does not fit the trace format ({np.dtype(dt).name})")
    return np.asarray(a, dtype=dt)


PACK_BLOCK_OPS = 1 << 22  # ops gathered into the columns at a time (their int32 ids staged)


class Programs:
    """Deduplicated programs, each kept as the int32 ids of its ops in a table of distinct ops.

    A builder adds hundreds of thousands of programs (one per distinct PE role; a prefill GEMM
    prefix has hundreds of millions of ops), most of whose ops recur across programs: an op
    costs one dict lookup and 4 bytes here, the program's ops can be dropped once added, and
    packing gathers the distinct ops' columns by id instead of staging every op's fields."""

    def __init__(self) -> None:
        self.op_ids: dict[Op, int] = {}  # distinct op -> id (insertion order)
        # id() of each op object kept as a key above -> its id: builders reuse op objects
        # (region.PartCache), and an int lookup is several times cheaper than an op's hash; the
        # objects are kept alive by op_ids, so their id()s cannot be reused
        self.by_object: dict[int, int] = {}
        self.ids: dict[bytes, int] = {}  # a program's op ids (int32 bytes) -> program id

    def __len__(self) -> int:
        return len(self.ids)

    def op_id(self, op: Op) -> int:
        """The id of op's content (a new id, and op kept, the first time it is seen)."""
        i = self.op_ids.get(op)
        if i is None:
            i = self.op_ids[op] = len(self.op_ids)
            self.by_object[id(op)] = i
        return i

    def add(self, ops: Iterable[Op]) -> int:
        """Id of a program with these ops; identical programs share one id."""
        ops = ops if isinstance(ops, (list, tuple)) else list(ops)
        ids = list(map(self.by_object.get, map(id, ops)))
        if None in ids:  # op objects not kept: by content
            for k, i in enumerate(ids):
                if i is None:
                    ids[k] = self.op_id(ops[k])
        return self.ids.setdefault(array("i", ids).tobytes(), len(self.ids))

    def pack(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """The programs (in id order) as op columns (TraceError naming a field whose value does
        not fit the file format), program starts and lengths."""
        n, width = len(self.op_ids), len(OP_COLUMNS)  # columns in Op field order
        table = np.fromiter(itertools.chain.from_iterable(self.op_ids), dtype=np.int64,
                            count=n * width).reshape(n, width)
        distinct = {name: _column(f"op field {name}", table[:, i], dt) for i, (name, dt) in enumerate(OP_COLUMNS)}
        lens = np.fromiter((len(k) // 4 for k in self.ids), dtype=np.int32, count=len(self.ids))
        starts = (np.cumsum(lens, dtype=np.int64) - lens).astype(np.int32)
        total = int(lens.sum(dtype=np.int64))
        cols = {name: np.empty(total, dtype=dt) for name, dt in OP_COLUMNS}
        at, block, size = 0, [], 0
        for key in itertools.chain(self.ids, [None]):
            if key is not None:
                block.append(key)
                size += len(key) // 4
            if size and (size >= PACK_BLOCK_OPS or key is None):
                idx = np.frombuffer(b"".join(block), dtype=np.int32)
                for name, _ in OP_COLUMNS:
                    cols[name][at:at + size] = distinct[name][idx]
                at, block, size = at + size, [], 0
        return cols, starts, lens


def pack_programs(programs: dict[tuple[Op, ...], int]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Programs given as ops -> program id (ids 0..n-1) packed as Programs.pack does."""
    table = Programs()
    for ops, _ in sorted(programs.items(), key=lambda kv: kv[1]):
        table.add(ops)
    return table.pack()


class TraceBuilder:
    """Builds a Trace: routes added per PE and color, programs deduplicated by content."""

    def __init__(self, mesh_width: int, mesh_height: int, threads: int = 1, **meta: str):
        self.mesh_width, self.mesh_height = mesh_width, mesh_height
        self.pe_program = np.full((mesh_height, mesh_width, threads), -1, dtype=np.int32)
        self._routes: list[tuple[int, int, int, int]] = []
        self._programs = Programs()
        self.meta = {k: str(v) for k, v in meta.items()}
        self.tags: list[Tag] = [UNTAGGED]
        self.tensors = TensorRecorder()

    def tag(self, name: str, layer: int = -1, kind: str = "") -> int:
        """Id of a workload-level op tag (created on first use)."""
        t = Tag(name, layer, kind)
        if t not in self.tags:
            self.tags.append(t)
        return self.tags.index(t)

    def route(self, x: int, y: int, color: int, rx: int, tx: Iterable[int]) -> None:
        """Static route at PE (x, y): wavelets of `color` entering from `rx` leave through `tx`."""
        self._routes.append((y * self.mesh_width + x, color, rx, isa.tx_mask(*tx)))

    def program(self, ops: Iterable[Op]) -> int:
        """Id of a program with these ops; identical programs share one id."""
        ops = list(ops)
        if not ops:
            raise ValueError("a program needs at least one op")
        return self._programs.add(ops)

    def assign(self, x: int, y: int, thread: int, ops: Iterable[Op]) -> None:
        """Run `ops` on microthread `thread` of PE (x, y)."""
        if thread >= self.pe_program.shape[2]:
            extra = np.full(self.pe_program.shape[:2] + (thread + 1 - self.pe_program.shape[2],), -1, np.int32)
            self.pe_program = np.concatenate([self.pe_program, extra], axis=2)
        self.pe_program[y, x, thread] = self.program(ops)

    def build(self) -> Trace:
        ops, starts, lens = self._programs.pack()
        r = np.array(self._routes, dtype=np.int64).reshape(-1, 4)
        routes = {name: _column(f"route field {name}", r[:, i], dt) for i, (name, dt) in enumerate(ROUTE_COLUMNS)}
        return Trace(self.mesh_width, self.mesh_height, routes, ops, starts, lens,
                     self.pe_program.copy(), dict(self.meta), list(self.tags), self.tensors.build())
