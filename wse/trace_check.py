"""Checking a trace against a wafer configuration: routes, ops and programs, each problem one
TraceError naming the PE, color or op at fault (structural checks that need no configuration are
trace.check_structure, run when a trace is read)."""
from __future__ import annotations

import numpy as np

from . import isa
from .errors import TraceError
from .hardware import WaferConfig
from .engine.tables import route_order, routes_broken
from .op_codes import distinct_ops, row_codes
from .trace import Op, Trace, check_structure, op_location


def validate(t: Trace, cfg: WaferConfig, where: str = "trace", fit: bool = True) -> None:
    """Check the trace against a wafer: raise TraceError naming the PE, color or op at fault.
    fit=False skips the mesh size (a composition's stage trace may hold a stand-in beside the
    regions of a wafer it models)."""
    check_structure(t, where)
    W, H = t.mesh_width, t.mesh_height
    if fit and (W > cfg.mesh_width or H > cfg.mesh_height):
        raise TraceError(f"{where}: trace mesh {W}x{H} does not fit wafer {cfg.name} "
                         f"({cfg.mesh_width}x{cfg.mesh_height})")
    if t.threads > cfg.microthreads:
        used = np.nonzero((t.pe_program[:, :, cfg.microthreads:] >= 0))
        if len(used[0]):
            y, x, th = int(used[0][0]), int(used[1][0]), int(used[2][0]) + cfg.microthreads
            raise TraceError(f"{where}: PE ({x}, {y}) uses thread {th} but wafer {cfg.name} "
                             f"has {cfg.microthreads} microthreads")
    _validate_routes(t, cfg, where)
    _validate_ops(t, cfg, where)
    _validate_pe_programs(t, where)


def _validate_routes(t: Trace, cfg: WaferConfig, where: str) -> None:
    """Every route rule checked in one compiled pass (engine.tables.routes_broken); where one
    is broken, the whole-array checks below name the first route at fault."""
    r = t.routes
    if not len(r["pe"]):
        return
    order = route_order(r["pe"], r["color"], t.n_pes)
    if routes_broken(r["pe"], r["color"], r["rx"], r["tx"], order, t.mesh_width, t.mesh_height, cfg.colors):
        _name_route_problem(t, cfg, where)
        raise AssertionError(f"{where}: a route rule is broken, but the checks naming it found none")


def _name_route_problem(t: Trace, cfg: WaferConfig, where: str) -> None:
    """Raise TraceError naming the first route that breaks a rule (whole-array checks)."""
    r = t.routes
    pe, color, rx, tx = (r[k].astype(np.int64) for k in ("pe", "color", "rx", "tx"))
    W, H = t.mesh_width, t.mesh_height
    x, y = pe % W, pe // W

    def fail(i: int, msg: str) -> None:
        raise TraceError(f"{where}: PE ({x[i]}, {y[i]}) color {color[i]}: {msg}")

    bad = np.nonzero((color < 0) | (color >= cfg.colors))[0]
    if len(bad):
        fail(bad[0], f"color out of range (wafer {cfg.name} has {cfg.colors} colors)")
    key = pe * 64 + color
    order = np.argsort(key, kind="stable")
    dup = np.nonzero(np.diff(key[order]) == 0)[0]
    if len(dup):
        fail(order[dup[0] + 1], "more than one route for this color")
    bad = np.nonzero(tx >> rx & 1)[0]
    if len(bad):
        fail(bad[0], f"route sends back out of its rx port {isa.PORT_NAMES[rx[bad[0]]]}")
    for p in range(isa.N_LINK_PORTS):
        nx, ny = x + isa.PORT_DX[p], y + isa.PORT_DY[p]
        off = (nx < 0) | (nx >= W) | (ny < 0) | (ny >= H)
        bad = np.nonzero(off & ((tx >> p & 1) == 1))[0]
        if len(bad):
            fail(bad[0], f"route sends {isa.PORT_NAMES[p]}, off the mesh")
        bad = np.nonzero(off & (rx == p))[0]
        if len(bad):
            fail(bad[0], f"route receives from {isa.PORT_NAMES[p]}, off the mesh")
    # Every wavelet sent to a neighbour must land in a route that receives from this side.
    sorted_keys = key[order]
    for p in range(isa.N_LINK_PORTS):
        src = np.nonzero(tx >> p & 1)[0]
        if not len(src):
            continue
        nkey = ((y[src] + isa.PORT_DY[p]) * W + x[src] + isa.PORT_DX[p]) * 64 + color[src]
        pos = np.searchsorted(sorted_keys, nkey)
        pos_c = np.minimum(pos, len(sorted_keys) - 1)
        found = sorted_keys[pos_c] == nkey
        j = order[pos_c]
        ok = found & (rx[j] == isa.PORT_OPPOSITE[p])
        bad = np.nonzero(~ok)[0]
        if len(bad):
            i = src[bad[0]]
            fail(i, f"route sends {isa.PORT_NAMES[p]} but PE ({x[i] + isa.PORT_DX[p]}, "
                    f"{y[i] + isa.PORT_DY[p]}) has no route for color {color[i]} receiving from "
                    f"{isa.PORT_NAMES[isa.PORT_OPPOSITE[p]]}: wavelets would be lost")


def _validate_ops(t: Trace, cfg: WaferConfig, where: str) -> None:
    used = np.zeros(len(t.prog_start), dtype=bool)
    ids = t.pe_program[t.pe_program >= 0]
    used[np.unique(ids)] = True
    pids = np.nonzero(used)[0]
    if not len(pids):
        return
    order = np.concatenate([np.arange(t.prog_start[p], t.prog_start[p] + t.prog_len[p]) for p in pids])
    reps, inverse = distinct_ops(t, order)
    failing: dict[int, str] = {}
    for u, i in enumerate(reps):
        msg = _op_problem(t.op(int(i)), cfg)
        if msg:
            failing[u] = msg
    if failing:  # the first failing op in program order, named with its own location
        j = int(np.nonzero(np.isin(inverse, list(failing)))[0][0])
        raise TraceError(f"{where}: {op_location(t, int(order[j]))}: {failing[int(inverse[j])]}")


def _op_problem(op: Op, cfg: WaferConfig) -> str | None:
    """Why an op cannot run on this configuration, or None."""
    msg = None
    computes = op.opcode in (isa.OP_COMPUTE, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND)
    if computes and cfg.simd_width(op.kind, op.dtype) is None:
        msg = f"no {isa.KIND_NAMES[op.kind]} instruction for dtype {isa.DTYPE_NAMES[op.dtype]}"
    for c, role, needed in ((op.color_in, "input", op.opcode in (isa.OP_RECV, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND)),
                            (op.color_out, "output", op.opcode in (isa.OP_SEND, isa.OP_RECV_COMPUTE_SEND))):
        if needed and not 0 <= c < cfg.colors:
            msg = f"{role} color {c} out of range (wafer {cfg.name} has {cfg.colors} colors)"
    if msg is None:
        reads, writes = isa.op_streams(op.opcode, op.kind, op.dtype, op.dst, op.src0, op.src1)
        dot = op.kind in isa.KIND_REDUCES
        for k, (addr, nbytes) in enumerate(reads + writes):
            n = 1 if dot and k >= len(reads) else op.length  # (DOT, RMAX, RSUM: a stride-0 accumulator)
            end = addr + n * nbytes
            if addr < 0 or end > cfg.sram_bytes:
                msg = (f"SRAM operand [{addr}, {end}) is outside the {cfg.sram_bytes}-byte SRAM")
                break
            if addr % nbytes:
                msg = f"SRAM operand at {addr} is not aligned to its {nbytes}-byte elements"
                break
    return msg


def _program_tables(t: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per program: semaphore balance [n_prog, MAX_SEM], send-color mask, recv-color mask."""
    n = len(t.prog_start)
    bal = np.zeros((n, isa.MAX_SEMAPHORES), dtype=np.int64)
    smask = np.zeros(n, dtype=np.int64)
    rmask = np.zeros(n, dtype=np.int64)
    o = t.ops
    prog_of_op = np.repeat(np.arange(n), t.prog_len)
    idx = np.concatenate([np.arange(s, s + l) for s, l in zip(t.prog_start, t.prog_len)]) if n else np.zeros(0, int)
    code = o["opcode"][idx]
    for which, sign in ((isa.OP_SIGNAL, 1), (isa.OP_WAIT, -1)):
        m = code == which
        np.add.at(bal, (prog_of_op[m], o["sem"][idx][m].astype(np.int64)), sign)
    m = np.isin(code, (isa.OP_SEND, isa.OP_RECV_COMPUTE_SEND))
    np.bitwise_or.at(smask, prog_of_op[m], np.int64(1) << o["color_out"][idx][m].astype(np.int64))
    m = np.isin(code, (isa.OP_RECV, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND))
    np.bitwise_or.at(rmask, prog_of_op[m], np.int64(1) << o["color_in"][idx][m].astype(np.int64))
    return bal, smask, rmask


def _validate_pe_programs(t: Trace, where: str) -> None:
    """Per PE: semaphores balance; sends and receives use colors routed to/from the ramp."""
    W, H, T = t.mesh_width, t.mesh_height, t.threads
    if len(t.prog_start) == 0:
        return
    bal, smask, rmask = _program_tables(t)
    pp = t.pe_program.reshape(W * H, T)
    # per distinct assignment of programs to threads (a few thousand on a wafer), mapped back
    _, first, inverse = np.unique(row_codes([pp[:, h] for h in range(T)]), return_index=True, return_inverse=True)
    up = pp[first]
    has = up >= 0
    safe = np.where(has, up, 0)
    u_bal = (bal[safe] * has[:, :, None]).sum(axis=1)
    bad = np.nonzero(np.any(u_bal != 0, axis=1)[inverse.reshape(-1)])[0]
    if len(bad):
        p = bad[0]
        pe_bal = u_bal[inverse.reshape(-1)[p]]
        s = int(np.nonzero(pe_bal)[0][0])
        raise TraceError(f"{where}: PE ({p % W}, {p // W}): semaphore {s} has "
                         f"{'more signals than waits' if pe_bal[s] > 0 else 'more waits than signals'}")
    pe_send = np.bitwise_or.reduce(np.where(has, smask[safe], 0), axis=1)[inverse.reshape(-1)]
    pe_recv = np.bitwise_or.reduce(np.where(has, rmask[safe], 0), axis=1)[inverse.reshape(-1)]
    r = t.routes
    ramp_in = np.zeros(W * H, dtype=np.int64)
    ramp_out = np.zeros(W * H, dtype=np.int64)
    rp, rc = r["pe"].astype(np.int64), r["color"].astype(np.int64)
    m = r["rx"] == isa.PORT_RAMP
    np.bitwise_or.at(ramp_in, rp[m], np.int64(1) << rc[m])
    m = (r["tx"].astype(np.int64) >> isa.PORT_RAMP & 1) == 1
    np.bitwise_or.at(ramp_out, rp[m], np.int64(1) << rc[m])
    for mask, have, what in ((pe_send, ramp_in, "sends on color {c} but has no route for it with rx = ramp"),
                             (pe_recv, ramp_out, "receives on color {c} but has no route for it with ramp in tx")):
        missing = mask & ~have
        bad = np.nonzero(missing)[0]
        if len(bad):
            p = bad[0]
            c = int(np.nonzero([(int(missing[p]) >> k) & 1 for k in range(64)])[0][0])
            raise TraceError(f"{where}: PE ({p % W}, {p // W}) {what.format(c=c)}")
