"""The plain-Python reference stepper: docs/model.md section 1, one cycle at a time.

This engine exists to be compared counter for counter against the Numba engine
(wse/engine/kernels.py). It is written independently of it, from the specification alone, and
favours clarity over speed: plain Python objects, one cycle at a time, with an explicit
phase 1 (router arbitration: decisions read only the state as it was at the end of the previous
cycle and are stored aside) and phase 2 (every PE applies those decisions to its own state: the
CE step, then the queue update). It is meant for small meshes (up to about 8x8) and runs of a
few thousand cycles.

Public API: `simulate(trace, cfg) -> EngineResult`. The trace is assumed already validated
(`wse.trace_check.validate`).

Points where docs/model.md leaves room for reading are marked "SPEC READING" below; each
takes the most literal reading.
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np

from .. import isa
from ..hardware import WaferConfig
from ..trace import Trace
from . import reference_values as RV
from .result import EngineResult

_RECEIVING_OPS = (isa.OP_RECV, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND)
_SENDING_OPS = (isa.OP_SEND, isa.OP_RECV_COMPUTE_SEND)
_COMPUTING_OPS = (isa.OP_COMPUTE, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND)

# Why a thread did not act in a cycle (its stall class), or None when it made progress.
_STALL_SRAM, _STALL_RECV, _STALL_SEND, _STALL_SYNC = "sram", "recv", "send", "sync"


# ---- static structure ------------------------------------------------------------------------

class _Route:
    """One route (PE, color): its router queue and, when tx contains the ramp, its CE queue.

    A queue is `occ` (ready + in flight), `ready`, and `inflight`, the cycles at which the
    wavelets in flight become ready, oldest first (a queue has one fixed arrival latency, so
    the deque stays sorted).
    """

    __slots__ = ("pe", "x", "y", "color", "rx", "tx", "tx_ports", "link_ports", "to_ramp",
                 "link_dests", "arrival_latency",
                 "occ", "ready", "inflight", "ce_occ", "ce_ready", "ce_inflight", "vals", "ce_vals")

    def __init__(self, pe: int, x: int, y: int, color: int, rx: int, tx: int):
        self.pe, self.x, self.y, self.color, self.rx, self.tx = pe, x, y, color, rx, tx
        self.tx_ports = isa.ports_of(tx)  # every tx port, the ramp included
        self.link_ports = [p for p in self.tx_ports if p < isa.N_LINK_PORTS]
        self.to_ramp = bool(tx >> isa.PORT_RAMP & 1)
        self.link_dests: list[_Route] = []  # per link port in tx: the neighbour's route, same color
        self.arrival_latency = 0  # latency of the link into this router queue (set later)
        self.occ = 0
        self.ready = 0
        self.inflight: deque[int] = deque()
        self.ce_occ = 0
        self.ce_ready = 0
        self.ce_inflight: deque[int] = deque()
        # functional runs: the payloads of the router and CE queues' wavelets, oldest first
        self.vals: deque[int] = deque()
        self.ce_vals: deque[int] = deque()


class _OpInfo:
    """Per-op constants, computed once from the op table and the configuration."""

    __slots__ = ("index", "op", "opcode", "setup", "length", "per_step", "n_reads", "n_writes",
                 "read_bytes", "write_bytes", "flops", "two_substeps", "passes", "receives", "sends",
                 "color_in", "color_out", "sem")

    def __init__(self, index: int, op, cfg: WaferConfig):
        self.index = index
        self.op = op
        self.opcode = op.opcode
        # a multi-pass kind (isa.KIND_PASSES) steps through its elements once per pass
        self.passes = isa.KIND_PASSES[op.kind] if op.opcode == isa.OP_COMPUTE else 1
        self.length = op.length * self.passes
        self.sem = op.sem
        self.color_in, self.color_out = op.color_in, op.color_out
        self.receives = op.opcode in _RECEIVING_OPS
        self.sends = op.opcode in _SENDING_OPS
        reads, writes = isa.op_streams(op.opcode, op.kind, op.dtype, op.dst, op.src0, op.src1)
        self.n_reads, self.n_writes = len(reads), len(writes)
        # Bytes per element summed over the streams: a step of n elements moves n * these.
        self.read_bytes = sum(b for _, b in reads)
        self.write_bytes = sum(b for _, b in writes)
        if op.opcode == isa.OP_COMPUTE:
            self.setup = cfg.vector_setup_cycles
            widest = max(b for _, b in reads + writes)
            self.per_step = min(cfg.simd_width(op.kind, op.dtype), cfg.sram_port_bytes // widest)
        elif op.opcode in (isa.OP_SIGNAL, isa.OP_WAIT):
            self.setup = 0
            self.per_step = 0
        else:  # send, recv, recv_compute, recv_compute_send: one wavelet, one element per step
            self.setup = cfg.fabric_setup_cycles
            self.per_step = 1
        # SPEC READING: FLOPs are counted for the computing ops only (compute and the fused
        # receive ops); send and recv do no arithmetic whatever their kind field holds (the
        # builders leave it at KIND_NONE, whose FLOPs are 0 anyway).
        self.flops = isa.KIND_FLOPS[op.kind] * isa.DTYPE_VALUES[op.dtype] // self.passes \
            if op.opcode in _COMPUTING_OPS else 0
        # "A step with two read streams is done in two one-cycle substeps ... when the streams
        # conflict ... or when sram_read_ports is 1."
        self.two_substeps = False
        if len(reads) == 2:
            a, b = reads[0][0], reads[1][0]
            self.two_substeps = (_bank_class(a, cfg) == _bank_class(b, cfg)
                                 or cfg.sram_read_ports == 1)

    def name(self) -> str:
        return self.op.describe()


def _bank_class(addr: int, cfg: WaferConfig) -> int:
    """((a / sram_bank_word_bytes) mod sram_banks) mod sram_bank_conflict_modulus."""
    # SPEC READING: "a / sram_bank_word_bytes" is integer division (the word index).
    return ((addr // cfg.sram_bank_word_bytes) % cfg.sram_banks) % cfg.sram_bank_conflict_modulus


class _Thread:
    """One microthread: its program and where it is in its current op."""

    __slots__ = ("index", "ops", "pc", "setup_left", "remaining", "substep", "stall")

    def __init__(self, index: int, ops: list[_OpInfo]):
        self.index = index
        self.ops = ops
        self.pc = 0
        self.stall = None  # stall class of the last cycle, None if it progressed
        self.setup_left = 0
        self.remaining = 0
        self.substep = 0
        self._begin_op()

    def _begin_op(self) -> None:
        if self.pc < len(self.ops):
            op = self.ops[self.pc]
            self.setup_left = op.setup
            self.remaining = op.length
            self.substep = 0

    @property
    def finished(self) -> bool:
        return self.pc >= len(self.ops)

    @property
    def current(self) -> _OpInfo:
        return self.ops[self.pc]

    def complete_op(self) -> None:
        """The current op completed this cycle; the next one begins next cycle."""
        self.pc += 1
        self._begin_op()


class _PE:
    __slots__ = ("index", "x", "y", "routes", "route_by_color", "rr", "ce_rr", "threads", "sems",
                 "counters", "links", "granted", "arrived", "injected")

    def __init__(self, index: int, x: int, y: int):
        self.index, self.x, self.y = index, x, y
        self.routes: list[_Route] = []  # ordered by color
        self.route_by_color: dict[int, _Route] = {}
        self.rr = 0  # the route arbitration starts at
        self.ce_rr = 0  # the thread the CE step starts at
        self.threads: list[_Thread | None] = []
        self.sems = [0] * isa.MAX_SEMAPHORES
        self.counters = [0] * isa.N_PE_COUNTERS
        self.links = [[0] * isa.N_LINK_COUNTERS for _ in range(isa.N_LINK_PORTS)]
        # Decisions of the current cycle (phase 1 and CE step), applied by the queue update.
        self.granted: list[bool] = []  # per route: granted in phase 1
        self.arrived: list[bool] = []  # per route: a wavelet arrives at its router queue
        self.injected: set[int] = set()  # colors the CE injected on this cycle


# ---- the engine ------------------------------------------------------------------------------

class _Engine:
    def __init__(self, trace: Trace, cfg: WaferConfig, sram: np.ndarray | None = None):
        self.trace, self.cfg = trace, cfg
        # functional runs: every PE's SRAM bytes (uint8 [P, bytes]); None: timing only
        self.mem = None if sram is None else np.array(sram, dtype=np.uint8, copy=True)
        self.W, self.H, self.T = trace.mesh_width, trace.mesh_height, trace.threads
        self.depth = cfg.queue_depth_wavelets
        self.hop = cfg.hop_latency_cycles
        self.ramp = cfg.ramp_latency_cycles
        self.lwpc = cfg.link_wavelets_per_cycle
        # WaferConfig attribute access is a search; read the per-cycle values once.
        self.read_ports = cfg.sram_read_ports
        self.write_ports = cfg.sram_write_ports
        self.watchdog = cfg.watchdog_cycles
        self.max_cycles = cfg.max_cycles
        self.pes = [_PE(y * self.W + x, x, y) for y in range(self.H) for x in range(self.W)]
        self._build_routes()
        self._build_threads()
        self.total_occ = 0  # occ summed over every router and CE queue
        self.unfinished = sum(1 for pe in self.pes for th in pe.threads
                              if th is not None and not th.finished)

    def _build_routes(self) -> None:
        r = self.trace.routes
        for i in range(len(r["pe"])):
            pe = self.pes[int(r["pe"][i])]
            route = _Route(pe.index, pe.x, pe.y, int(r["color"][i]), int(r["rx"][i]), int(r["tx"][i]))
            route.arrival_latency = self.ramp if route.rx == isa.PORT_RAMP else self.hop
            pe.routes.append(route)
            pe.route_by_color[route.color] = route
        for pe in self.pes:
            pe.routes.sort(key=lambda rt: rt.color)
            pe.granted = [False] * len(pe.routes)
            pe.arrived = [False] * len(pe.routes)
        # Link destinations: for a link port p in tx, the router queue of the same color on
        # the neighbour across p (the validated trace guarantees it exists, with rx opposite).
        self.route_slot: dict[int, tuple[_PE, int]] = {}
        for pe in self.pes:
            for k, route in enumerate(pe.routes):
                self.route_slot[id(route)] = (pe, k)
                for p in route.link_ports:
                    nx, ny = pe.x + isa.PORT_DX[p], pe.y + isa.PORT_DY[p]
                    route.link_dests.append(self.pes[ny * self.W + nx].route_by_color[route.color])

    def _build_threads(self) -> None:
        tr = self.trace
        infos: dict[int, _OpInfo] = {}
        for pe in self.pes:
            for th in range(self.T):
                pid = int(tr.pe_program[pe.y, pe.x, th])
                if pid < 0:
                    pe.threads.append(None)
                    continue
                start, n = int(tr.prog_start[pid]), int(tr.prog_len[pid])
                ops = []
                for i in range(start, start + n):
                    if i not in infos:
                        infos[i] = _OpInfo(i, tr.op(i), self.cfg)
                    ops.append(infos[i])
                pe.threads.append(_Thread(th, ops))

    # ---- phase 1 ------------------------------------------------------------------------------

    def _arbitrate(self, pe: _PE) -> bool:
        """Phase 1 at one router: reads only end-of-previous-cycle state, records grants."""
        routes = pe.routes
        n = len(routes)
        granted = pe.granted
        for k in range(n):
            granted[k] = False
        if not any(route.ready > 0 for route in routes):
            return False  # nothing to forward: no grant, and no link counter changes
        carried = [0] * isa.N_PORTS  # wavelets through each port this cycle, ramp included
        first = -1
        for j in range(n):
            k = (pe.rr + j) % n
            route = routes[k]
            # 1. its router queue has ready > 0
            if route.ready <= 0:
                continue
            # 2. every port in tx has carried fewer than link_wavelets_per_cycle this cycle
            if any(carried[p] >= self.lwpc for p in route.tx_ports):
                continue
            # 3. every destination queue has occ < depth (occ as at the end of cycle t - 1)
            if any(d.occ >= self.depth for d in route.link_dests):
                continue
            if route.to_ramp and route.ce_occ >= self.depth:
                continue
            granted[k] = True
            for p in route.tx_ports:
                carried[p] += 1
            if first < 0:
                first = k
        # Link counters (outputs only; nothing in the engine reads them back). The ramp port
        # has none. "A route with a ready wavelet" is ready > 0 at the end of cycle t - 1,
        # whatever the reason it was not granted (port busy or no credit).
        waiting_ports = set()  # link ports wanted by a route with a ready wavelet, not granted
        for k, route in enumerate(routes):
            if route.ready > 0 and not granted[k]:
                waiting_ports.update(route.link_ports)
        for p in range(isa.N_LINK_PORTS):
            pe.links[p][isa.L_WAVELETS] += carried[p]
            if p in waiting_ports:
                if carried[p] >= self.lwpc:
                    pe.links[p][isa.L_CONTENTION] += 1
                else:
                    pe.links[p][isa.L_BLOCKED] += 1
        if first >= 0:
            # Next cycle starts at the route after the first one granted in this cycle.
            # SPEC READING: "granted first" is first in this cycle's visiting order (which
            # starts at rr), not the lowest-colored granted route.
            # (Only this PE's arbitration reads rr, and it has already run this cycle.)
            pe.rr = (first + 1) % n
            # Arrivals the grants cause, applied by the receivers' queue updates in phase 2.
            for k, route in enumerate(routes):
                if granted[k]:
                    if self.mem is not None:
                        # the oldest wavelet leaves (ready > 0: the oldest is ready); a copy
                        # goes to every queue the grant feeds
                        v = route.vals.popleft()
                        for d in route.link_dests:
                            d.vals.append(v)
                        if route.to_ramp:
                            route.ce_vals.append(v)
                    for d in route.link_dests:
                        dpe, dk = self.route_slot[id(d)]
                        dpe.arrived[dk] = True
            return True
        return False

    # ---- phase 2 ------------------------------------------------------------------------------

    def _ce_step(self, pe: _PE, t: int) -> bool:
        """Phase 2 step 1: the CE's threads act, starting at the thread after the one that took
        the first step in the last cycle in which one did (initially thread 0). Returns progress."""
        c = pe.counters
        reads_left = self.read_ports
        writes_left = self.write_ports
        inject_left = self.lwpc
        pe.injected.clear()
        signals: list[int] = []
        had_op = did_step = did_setup = False
        stalls = set()
        T = self.T
        first = -1
        for j in range(T):
            if first < 0 and did_step:
                first = (pe.ce_rr + j - 1) % T
            th = pe.threads[(pe.ce_rr + j) % T]
            if th is None or th.finished:
                continue
            had_op = True
            op = th.current
            th.stall = None
            if th.setup_left > 0:
                # "A thread in setup counts its setup down by one per cycle and uses no resources."
                th.setup_left -= 1
                did_setup = True
                continue
            if op.opcode == isa.OP_SIGNAL:
                # Takes effect at the end of the CE step.
                signals.append(op.sem)
                did_step = True
                self._complete(pe, th, t)
                continue
            if op.opcode == isa.OP_WAIT:
                # SPEC READING: the decrement is immediate, so a second thread waiting on the
                # same semaphore later in this CE step sees the decremented value.
                if pe.sems[op.sem] > 0:
                    pe.sems[op.sem] -= 1
                    did_step = True
                    self._complete(pe, th, t)
                else:
                    th.stall = _STALL_SYNC
                    stalls.add(_STALL_SYNC)
                continue
            last = (not op.two_substeps) or th.substep == 1
            # 1. (ops that receive, last substep) a ready wavelet not yet taken this cycle.
            #    ce_ready is the end-of-previous-cycle value minus this cycle's takes.
            if last and op.receives:
                inq = pe.route_by_color[op.color_in]
                if inq.ce_ready <= 0:
                    th.stall = _STALL_RECV
                    stalls.add(_STALL_RECV)
                    continue
            # 2. (ops that send, last substep) router queue occ < depth (occ as at the end of
            #    the previous cycle: this PE's queue update has not run yet), ramp budget left,
            #    and no other thread injected on that color this cycle.
            if last and op.sends:
                outq = pe.route_by_color[op.color_out]
                if (outq.occ >= self.depth or inject_left <= 0
                        or op.color_out in pe.injected):
                    th.stall = _STALL_SEND
                    stalls.add(_STALL_SEND)
                    continue
            # 3. enough read and write accesses left this cycle. Two substeps: one read access
            #    each; writes happen in the last substep.
            need_reads = 1 if op.two_substeps else op.n_reads
            need_writes = op.n_writes if last else 0
            if need_reads > reads_left or need_writes > writes_left:
                th.stall = _STALL_SRAM
                stalls.add(_STALL_SRAM)
                continue
            reads_left -= need_reads
            writes_left -= need_writes
            did_step = True
            if not last:
                th.substep = 1
                continue
            th.substep = 0
            # The last substep completed: count elements, bytes, FLOPs and wavelets.
            if self.mem is not None:
                self._values(pe, op, op.length - th.remaining, min(op.per_step, th.remaining))
            if op.receives:
                inq.ce_ready -= 1
                inq.ce_occ -= 1
                self.total_occ -= 1
                c[isa.C_RECEIVED] += 1
            if op.sends:
                inject_left -= 1
                pe.injected.add(op.color_out)
                c[isa.C_SENT] += 1
            n = min(op.per_step, th.remaining)
            th.remaining -= n
            c[isa.C_FLOPS] += n * op.flops
            c[isa.C_SRAM_READ] += n * op.read_bytes
            c[isa.C_SRAM_WRITE] += n * op.write_bytes
            if th.remaining == 0:
                self._complete(pe, th, t)
        if first < 0 and did_step:
            first = (pe.ce_rr + T - 1) % T
        if first >= 0:
            pe.ce_rr = (first + 1) % T
        for s in signals:
            pe.sems[s] += 1
        # PE cycle class: counted once, first matching class, when a thread had an op.
        if had_op:
            if did_step:
                c[isa.C_BUSY] += 1
            elif did_setup:
                c[isa.C_SETUP] += 1
            elif _STALL_SRAM in stalls:
                c[isa.C_STALL_SRAM] += 1
            elif _STALL_RECV in stalls:
                c[isa.C_STALL_RECV] += 1
            elif _STALL_SEND in stalls:
                c[isa.C_STALL_SEND] += 1
            elif _STALL_SYNC in stalls:
                c[isa.C_STALL_SYNC] += 1
        return did_step or did_setup

    def _values(self, pe: _PE, op: _OpInfo, e0: int, n: int) -> None:
        """Functional runs: elements e0 .. e0 + n - 1 of the op, in order (a fabric op moves one
        per step: the CE queue's oldest payload in, the result onto the router queue)."""
        mem = self.mem[pe.index]
        if op.passes > 1:  # a multi-pass kind's values appear in its last pass
            last = op.length - op.length // op.passes
            e0, n = max(e0, last) - last, e0 + n - max(e0, last)
        for e in range(e0, e0 + n):
            w = pe.route_by_color[op.color_in].ce_vals.popleft() if op.receives else None
            out = RV.step(mem, op.op, e, w)
            if op.sends:
                pe.route_by_color[op.color_out].vals.append(out)

    def _complete(self, pe: _PE, th: _Thread, t: int) -> None:
        c = pe.counters
        c[isa.C_OPS] += 1
        c[isa.C_FINISH] = max(c[isa.C_FINISH], t + 1)
        th.complete_op()
        if th.finished:
            self.unfinished -= 1

    def _queue_update(self, pe: _PE, t: int) -> None:
        """Phase 2 step 2, for every route of this PE."""
        c = pe.counters
        peak = c[isa.C_PEAK_QUEUE]
        # SPEC READING: "becomes ready at cycle t+L" and "a wavelet that arrives ready at cycle
        # t can be forwarded at cycle t" mean that the state at the end of cycle t holds as
        # ready every wavelet whose ready cycle is t+1 or earlier (phase 1 of cycle t+1 reads
        # that state). Both latencies are at least 1.
        horizon = t + 1
        for k, route in enumerate(pe.routes):
            # An arriving wavelet: granted by the rx-side neighbour, or injected by this CE.
            if route.rx == isa.PORT_RAMP:
                arrived = route.color in pe.injected
            else:
                arrived = pe.arrived[k]
                pe.arrived[k] = False
            if arrived:
                route.occ += 1
                self.total_occ += 1
                route.inflight.append(t + route.arrival_latency)
            # Wavelets whose latency has elapsed become ready.
            q = route.inflight
            while q and q[0] <= horizon:
                q.popleft()
                route.ready += 1
            # A granted route's wavelet leaves; towards the ramp it enters this route's CE queue.
            if pe.granted[k]:
                route.ready -= 1
                route.occ -= 1
                self.total_occ -= 1
                if route.to_ramp:
                    route.ce_occ += 1
                    self.total_occ += 1
                    route.ce_inflight.append(t + self.ramp)
            q = route.ce_inflight
            while q and q[0] <= horizon:
                q.popleft()
                route.ce_ready += 1
            if route.occ > peak:
                peak = route.occ
            if route.ce_occ > peak:
                peak = route.ce_occ
        c[isa.C_PEAK_QUEUE] = peak

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> tuple[int, int]:
        if self.unfinished == 0 and self.total_occ == 0:
            return 0, isa.STOP_COMPLETE  # nothing to do
        last_progress = -1
        t = 0
        while True:
            progress = False
            # Phase 1: every router decides from the state at the end of cycle t - 1.
            for pe in self.pes:
                if self._arbitrate(pe):
                    progress = True
            # Phase 2: every PE updates its own state: CE step, then queue update.
            for pe in self.pes:
                if self._ce_step(pe, t):
                    progress = True
                self._queue_update(pe, t)
            if progress:
                last_progress = t
            # End-of-cycle checks, in the order complete, deadlock, max_cycles.
            if self.unfinished == 0 and self.total_occ == 0:
                return t + 1, isa.STOP_COMPLETE
            if t - last_progress >= self.watchdog:
                return t + 1, isa.STOP_DEADLOCK
            if t + 1 >= self.max_cycles:
                return t + 1, isa.STOP_MAX_CYCLES
            t += 1

    def stuck_report(self) -> list[str]:
        out = []
        for pe in self.pes:
            for th in pe.threads:
                if th is None or th.finished:
                    continue
                op = th.current
                where = (f"PE ({pe.x}, {pe.y}) thread {th.index} op {th.pc} ({op.name()})")
                if th.setup_left > 0:
                    out.append(f"{where}: in setup, {th.setup_left} cycles left")
                elif th.stall == _STALL_SYNC or op.opcode == isa.OP_WAIT:
                    out.append(f"{where}: waits on semaphore {op.sem} (value {pe.sems[op.sem]})")
                elif th.stall == _STALL_RECV:
                    out.append(f"{where}: waits for a wavelet on color {op.color_in}, "
                               f"{th.remaining} of {op.length} elements left")
                elif th.stall == _STALL_SEND:
                    out.append(f"{where}: waits for queue room to send on color {op.color_out}, "
                               f"{th.remaining} of {op.length} elements left")
                elif th.stall == _STALL_SRAM:
                    out.append(f"{where}: waits for SRAM ports, {th.remaining} of {op.length} "
                               f"elements left")
                else:
                    colors = []
                    if op.receives:
                        colors.append(f"receives color {op.color_in}")
                    if op.sends:
                        colors.append(f"sends color {op.color_out}")
                    extra = f" ({', '.join(colors)})" if colors else ""
                    out.append(f"{where}: running{extra}, {th.remaining} of {op.length} "
                               f"elements left")
        for pe in self.pes:
            for route in pe.routes:
                if route.occ:
                    out.append(f"PE ({pe.x}, {pe.y}) color {route.color}: router queue holds "
                               f"{route.occ} wavelets ({route.ready} ready)")
                if route.ce_occ:
                    out.append(f"PE ({pe.x}, {pe.y}) color {route.color}: CE queue holds "
                               f"{route.ce_occ} wavelets ({route.ce_ready} ready)")
        return out

    def counter_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        pe_c = np.zeros((self.H, self.W, isa.N_PE_COUNTERS), dtype=np.int64)
        link_c = np.zeros((self.H, self.W, isa.N_LINK_PORTS, isa.N_LINK_COUNTERS), dtype=np.int64)
        for pe in self.pes:
            pe_c[pe.y, pe.x, :] = pe.counters
            link_c[pe.y, pe.x, :, :] = pe.links
        return pe_c, link_c


def simulate(trace: Trace, cfg: WaferConfig, sram: np.ndarray | None = None) -> EngineResult:
    """Run a validated trace on a wafer configuration, one cycle at a time. Given `sram` (uint8
    [P, bytes], every PE's initial SRAM), the run is functional: wavelets carry payloads and ops
    compute, and the result's `sram` holds the bytes at the end."""
    start = time.perf_counter()
    eng = _Engine(trace, cfg, sram)
    total, stop = eng.run()
    pe_c, link_c = eng.counter_arrays()
    stuck = eng.stuck_report() if stop != isa.STOP_COMPLETE else []
    return EngineResult(total_cycles=int(total), stop=int(stop), pe_counters=pe_c,
                        link_counters=link_c, stuck=stuck,
                        wall_seconds=time.perf_counter() - start, threads=1, sram=eng.mem)
