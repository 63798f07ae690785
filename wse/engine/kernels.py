"""Numba kernels: the two-phase cycle of docs/model.md over packed per-PE records.

Phase 1 (arbitration.py) reads only last cycle's state and writes each PE's own grant mask, round-robin pointer,
grant counts and link counters, plus the arrival field (and tile kick flag) its grants send to, which only
it writes. Phase 2 runs each PE's CE step and queue update, reading its arrivals and writing
only that PE's records. Each phase is a loop over tiles of PEs dealt to groups (`prange` over
the groups in the parallel kernel, integer-sum reductions only), so results do not depend on
the thread count or the tile shape. Kernels import only numpy, numba, the prefetch hint and its rule
(prefetch.py) and integer constants (ISA codes and record layouts).

The state arrives as flat 1-D arrays (layout.py gives the record fields: a route slot's rt and
q records share one 64-byte record, rt the flat records and q the same memory 8 fields on, so a
field's index is ((slot0[p] + k) << SLOT_SHIFT) + FIELD for a PE's slot k (slots are kept only for
the routes a PE has); thread records have 8 fields, base (p * T + h) << 3; PE records 16, base
p << PSHIFT) and every index is cast to uint64 at the point of use: Numba then emits a plain
load, without the negative-index wraparound and runtime-stride multiplications it adds for
signed, multi-dimensional indexing.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..isa import (
    C_BUSY, C_SETUP, C_STALL_RECV, C_STALL_SEND, C_STALL_SRAM, C_STALL_SYNC, MAX_SEMAPHORES, OP_SIGNAL, OP_WAIT,
    PORT_RAMP, STOP_COMPLETE, STOP_DEADLOCK,
)
from numba.cpython.unsafe.numbers import trailing_zeros

from .accounting import PSHIFT, _u, chain_end, complete_op, hot, wake_ce
from .arbitration import _phase1
from .prefetch import passes_pay, prefetch
from .layout import (
    CODE_DONE, CQ_OCC, CQ_PIPE, CQ_READY, CTRL_CODE, CTRL_SUB, CTRL_TWO, PE_CE_RR, PE_GRANT, PE_HELD,
    PE_ARRIVE, PE_LIVE, PE_PEAK, PE_PIPES, PE_READY, PE_ROUTES, PE_SLEEP_CLASS, PE_SLEEP_THREAD,
    Q_OCC, Q_PIPE, Q_READY, RT_RX, RT_TX,
    TH_CTRL, TH_IN, TH_LEFT, TH_OUT, TH_SETUP, TH_WIDTH, TL_PENDING, TL_PROGRESSED,
    TL_WAKE, TL_FIELDS, TL_DIRTY, SLOT_SHIFT, ROUTES_MASK, SPAN_SHIFT, MASK32,
)

RUNNING = -1  # returned when the chunk ended before the run did
NEVER = 1 << 62  # a wake-up time that never comes


@hot
def _update_tile(b, t, F, I, A, grp, n_tags, max_events, W, T, n_colors, depth, cap, hop_bit,
                 ramp_bit, read_ports, write_ports, skip):
    """Phase 2 for the PEs of tile b: CE step, then queue update; where they pay
    (prefetch.passes_pay), first passes prefetch the records those steps will read.

    Returns (wavelets held + live threads, PEs that progressed, earliest wake-up of a sleeping
    CE, PEs that took the full path, whether phase 1 must visit the tile next cycle (a ready
    wavelet or a grant to clear), whether phase 2 must (that, a wavelet in flight or an awake
    CE), CEs asleep in busy or setup). Reads the PEs' arrival fields; writes
    only these PEs' records and the tile's phase-2 busy count; grp indexes the tag statistics of the group stepping the tile.

    Exact skipping (skip=True): a CE whose threads all stall or count down setup sleeps until
    the first setup ends or a wavelet arrives in one of its CE queues or leaves one of its
    ramp-fed router queues, the only events that can change what it does; the cycles it
    sleeps are added to the class it was in (all that could have happened). A CE whose one
    progressing thread computes from SRAM alone sleeps through the run of local compute ops
    ahead of it (accounting.chain_end); waking replays the ops completed meanwhile
    (accounting.account_sleep). A PE whose CE is idle or asleep, with nothing in flight,
    nothing granted and nothing arriving, is skipped whole.
    """
    x0, x1 = A.rect[_u(b << 2)], A.rect[_u((b << 2) + 1)]
    y0, y1 = A.rect[_u((b << 2) + 2)], A.rect[_u((b << 2) + 3)]
    rt = F.rt
    q = F.q
    th = F.th
    pe = F.pe
    slot0 = F.slot0
    sem = F.sem
    sem_add = F.sem_add
    cyc = F.cyc
    finish = F.finish
    ot = F.ot
    om = F.omap
    th_start = I.th_start
    sleep_until = F.sleep_until
    sleep_from = F.sleep_from
    P = finish.shape[0]
    rshift = SLOT_SHIFT
    pending = 0
    progressed = 0
    next_wake = NEVER
    active = 0
    need1 = False
    again = False  # phase 2 must visit the tile next cycle
    sleepers = 0  # CEs asleep in busy or setup after this cycle
    y_pf = y1 if passes_pay(A.busy[_u((b << 1) + 1)], x0, x1, y0, y1) else y0
    for y in range(y0, y_pf):  # first, the records of the slots that move and of awake CEs' threads
        for p in range(y * W + x0, y * W + x1):
            pb = p << PSHIFT
            m = (pe[_u(pb + PE_PIPES)] | pe[_u(pb + PE_GRANT)] | pe[_u(pb + PE_ARRIVE)] | pe[_u(pb + PE_ARRIVE + 1)]
                 | pe[_u(pb + PE_ARRIVE + 2)] | pe[_u(pb + PE_ARRIVE + 3)]) & MASK32
            qb = slot0[_u(p)] << rshift
            while m != 0:
                prefetch(q, _u(qb + (trailing_zeros(m) << rshift)))
                m &= m - 1
            if pe[_u(pb + PE_LIVE)] > 0 and sleep_until[_u(p)] <= t:
                prefetch(th, _u((p * T + pe[_u(pb + PE_CE_RR)]) << 3))
    for y in range(y0, y_pf):  # then the CE queues awake CEs' threads receive from
        for p in range(y * W + x0, y * W + x1):
            pb = p << PSHIFT
            if pe[_u(pb + PE_LIVE)] > 0 and sleep_until[_u(p)] <= t:
                qb = slot0[_u(p)] << rshift
                for h in range(pe[_u(pb + PE_ROUTES)] >> SPAN_SHIFT):
                    islot = th[_u(((p * T + h) << 3) + TH_IN)]
                    if islot >= 0:
                        prefetch(q, _u(qb + (islot << rshift)))
    for y in range(y0, y1):
        for p in range(y * W + x0, y * W + x1):
            pb = p << PSHIFT
            routes = pe[_u(pb + PE_ROUTES)]  # (route count and thread span)
            nr = routes & ROUTES_MASK
            lv = pe[_u(pb + PE_LIVE)]
            if nr == 0 and lv == 0:
                continue
            asleep = lv > 0 and sleep_until[_u(p)] > t
            arrived = (pe[_u(pb + PE_ARRIVE)] | pe[_u(pb + PE_ARRIVE + 1)] | pe[_u(pb + PE_ARRIVE + 2)]
                       | pe[_u(pb + PE_ARRIVE + 3)]) & MASK32
            if skip and (lv == 0 or asleep) and pe[_u(pb + PE_GRANT)] == 0 and pe[_u(pb + PE_PIPES)] == 0 \
                    and arrived == 0:
                if asleep:
                    if pe[_u(pb + PE_SLEEP_CLASS)] <= C_SETUP:  # busy or setup: progress
                        progressed += 1
                        sleepers += 1
                    w = sleep_until[_u(p)]
                    if w < next_wake:
                        next_wake = w
                pending += pe[_u(pb + PE_HELD)] + lv
                if pe[_u(pb + PE_READY)] != 0:  # blocked wavelets: phase 1 counts them
                    need1 = True
                continue
            active += 1
            qb = slot0[_u(p)] << rshift
            held = pe[_u(pb + PE_HELD)]
            if arrived != 0:
                for port in range(4):
                    pe[_u(pb + PE_ARRIVE + port)] = 0
            # step 1: the CE's microthreads
            sent = 0  # slots injected into this cycle
            if lv > 0 and asleep:
                w = sleep_until[_u(p)]
                if w < next_wake:
                    next_wake = w
                if pe[_u(pb + PE_SLEEP_CLASS)] <= C_SETUP:
                    progressed += 1
            elif lv > 0:
                if sleep_until[_u(p)] != 0:
                    wake_ce(p, t, T, grp, F, I, n_tags, max_events, n_colors)
                min_setup = NEVER  # setup cycles left, after this cycle, of threads in setup
                rd = read_ports
                wr = write_ports
                ramp = cap
                busy = False
                setup = False
                st_sram = False
                st_recv = False
                st_send = False
                st_sync = False
                signalled = False
                stepped = 0  # threads that did something this cycle
                ff_h = -1  # the thread that took a step of a local compute op it did not finish
                h = pe[_u(pb + PE_CE_RR)]
                span = routes >> SPAN_SHIFT  # (threads from span on have no program)
                first = -1  # the first thread that took a step
                for _j in range(span):
                    if first < 0 and busy:
                        first = h - 1 if h > 0 else span - 1
                    hb = (p * T + h) << 3
                    ctrl = th[_u(hb + TH_CTRL)]
                    code = ctrl & CTRL_CODE
                    if code != CODE_DONE:
                        done = False
                        left_setup = th[_u(hb + TH_SETUP)]
                        if left_setup > 0:
                            th[_u(hb + TH_SETUP)] = left_setup - 1
                            setup = True
                            if left_setup - 1 < min_setup:
                                min_setup = left_setup - 1
                        elif code == OP_SIGNAL:
                            sem_add[_u(p * MAX_SEMAPHORES + (ctrl >> 12))] += 1
                            signalled = True
                            busy = True
                            done = True
                            stepped += 1
                        elif code == OP_WAIT:
                            si = _u(p * MAX_SEMAPHORES + (ctrl >> 12))
                            if sem[si] > 0:
                                sem[si] -= 1
                                busy = True
                                done = True
                                stepped += 1
                            else:
                                st_sync = True
                        elif (ctrl & CTRL_TWO) != 0 and (ctrl & CTRL_SUB) == 0:
                            # first of two substeps: one read access
                            need_r = (ctrl >> 6) & 3
                            if need_r > rd:
                                st_sram = True
                            else:
                                rd -= need_r
                                th[_u(hb + TH_CTRL)] = ctrl | CTRL_SUB
                                busy = True
                                stepped += 1
                                if th_start[_u(p * T + h)] < 0:
                                    th_start[_u(p * T + h)] = t
                        else:
                            islot = th[_u(hb + TH_IN)]
                            oslot = th[_u(hb + TH_OUT)]
                            need_r = (ctrl >> 8) & 3
                            need_w = (ctrl >> 10) & 3
                            if islot >= 0 and q[_u(qb + (islot << rshift) + CQ_READY)] == 0:
                                st_recv = True
                            elif oslot >= 0 and (q[_u(qb + (oslot << rshift) + Q_OCC)] >= depth
                                                 or ramp == 0 or (sent >> oslot) & 1):
                                st_send = True
                            elif need_r > rd or need_w > wr:
                                st_sram = True
                            else:
                                rd -= need_r
                                wr -= need_w
                                busy = True
                                stepped += 1
                                if th_start[_u(p * T + h)] < 0:
                                    th_start[_u(p * T + h)] = t
                                if ctrl & CTRL_SUB:
                                    th[_u(hb + TH_CTRL)] = ctrl ^ CTRL_SUB
                                if islot >= 0:
                                    ib = qb + (islot << rshift)
                                    q[_u(ib + CQ_READY)] -= 1
                                    q[_u(ib + CQ_OCC)] -= 1
                                    held -= 1
                                if oslot >= 0:
                                    sent |= 1 << oslot
                                    ramp -= 1
                                left = th[_u(hb + TH_LEFT)] - th[_u(hb + TH_WIDTH)]
                                if left > 0:
                                    th[_u(hb + TH_LEFT)] = left
                                    if islot < 0 and oslot < 0 and (ctrl & CTRL_TWO) == 0:
                                        ff_h = h
                                else:
                                    th[_u(hb + TH_LEFT)] = 0
                                    done = True
                        if done:
                            complete_op(p, h, t, grp, F, I, n_tags, max_events, T, n_colors)
                    h += 1
                    if h == span:
                        h = 0
                if first < 0 and busy:
                    first = h - 1 if h > 0 else span - 1
                if first >= 0:
                    pe[_u(pb + PE_CE_RR)] = first + 1 if first + 1 < span else 0
                if signalled:
                    for s in range(MAX_SEMAPHORES):
                        si = _u(p * MAX_SEMAPHORES + s)
                        sem[si] += sem_add[si]
                        sem_add[si] = 0
                cls = -1
                if busy:
                    cls = C_BUSY
                    progressed += 1
                elif setup:
                    cls = C_SETUP
                    progressed += 1
                elif st_sram:
                    cls = C_STALL_SRAM
                elif st_recv:
                    cls = C_STALL_RECV
                elif st_send:
                    cls = C_STALL_SEND
                elif st_sync:
                    cls = C_STALL_SYNC
                if cls >= 0:
                    cyc[_u(cls * P + p)] += 1
                if skip and cls >= 0 and pe[_u(pb + PE_LIVE)] > 0:
                    until = t + 1
                    if not busy:
                        # nothing moved: sleep until the first setup ends (or an event wakes the CE)
                        until = t + 1 + min_setup if setup else NEVER
                    elif stepped == 1 and ff_h >= 0 and not st_sram:
                        # one thread computes from SRAM alone, the others wait for events or setup:
                        # it steps identically until its op's last step or the first setup ends
                        until = chain_end(p, ff_h, t, T, th, ot, om)
                        if setup and t + 1 + min_setup < until:
                            until = t + 1 + min_setup
                        pe[_u(pb + PE_SLEEP_THREAD)] = ff_h
                    if until > t + 1:
                        sleep_until[_u(p)] = until
                        sleep_from[_u(p)] = t + 1
                        pe[_u(pb + PE_SLEEP_CLASS)] = cls

            # step 2: queue update (arrivals, latency, departures) of the slots where something
            # moves: a wavelet in a pipe, a grant, an arrival or an injection; the PE's ready and
            # pipe masks and its count of held wavelets are kept up to date incrementally
            if nr > 0:
                g = pe[_u(pb + PE_GRANT)] & MASK32
                ready_m = pe[_u(pb + PE_READY)] & MASK32
                pipes = pe[_u(pb + PE_PIPES)] & MASK32
                top = 0
                woke = False
                m = pipes | g | arrived | sent
                while m != 0:
                    k = trailing_zeros(m)
                    m &= m - 1
                    bit = 1 << k
                    kb = qb + (k << rshift)
                    pipe = q[_u(kb + Q_PIPE)]
                    occ0 = q[_u(kb + Q_OCC)]
                    occ = occ0
                    if sent & bit:
                        pipe |= ramp_bit
                        occ += 1
                    if arrived & bit:
                        pipe |= hop_bit
                        occ += 1
                    cocc0 = q[_u(kb + CQ_OCC)]
                    cocc = cocc0
                    ready = q[_u(kb + Q_READY)]
                    if pipe != 0 or g & bit:
                        ready += pipe & 1
                        pipe >>= 1
                        if g & bit:
                            ready -= 1
                            occ -= 1
                            if rt[_u(kb + RT_RX)] == PORT_RAMP:
                                woke = True  # room again for a send
                            if (rt[_u(kb + RT_TX)] >> PORT_RAMP) & 1:
                                q[_u(kb + CQ_PIPE)] |= ramp_bit
                                cocc += 1
                                q[_u(kb + CQ_OCC)] = cocc
                        q[_u(kb + Q_READY)] = ready
                        q[_u(kb + Q_PIPE)] = pipe
                        q[_u(kb + Q_OCC)] = occ
                    cpipe = q[_u(kb + CQ_PIPE)]
                    if cpipe != 0:
                        if cpipe & 1:
                            woke = True  # a wavelet for a receive
                        q[_u(kb + CQ_READY)] += cpipe & 1
                        cpipe >>= 1
                        q[_u(kb + CQ_PIPE)] = cpipe
                    if pipe != 0 or cpipe != 0:
                        pipes |= bit
                    else:
                        pipes &= ~bit
                    if ready > 0:
                        ready_m |= bit
                    else:
                        ready_m &= ~bit
                    if occ > top:
                        top = occ
                    if cocc > top:
                        top = cocc
                    held += occ - occ0 + cocc - cocc0
                if top > pe[_u(pb + PE_PEAK)]:
                    pe[_u(pb + PE_PEAK)] = top
                pe[_u(pb + PE_READY)] = ready_m
                pe[_u(pb + PE_PIPES)] = pipes
                if woke and sleep_until[_u(p)] > t + 1:
                    sleep_until[_u(p)] = t + 1
                if ready_m != 0 or g != 0:
                    need1 = True
                if pipes != 0:
                    again = True
            pe[_u(pb + PE_HELD)] = held
            pending += held + pe[_u(pb + PE_LIVE)]
            if lv > 0 and sleep_until[_u(p)] > t:
                w = sleep_until[_u(p)]
                if w < next_wake:
                    next_wake = w
                if pe[_u(pb + PE_SLEEP_CLASS)] <= C_SETUP:
                    sleepers += 1
            elif pe[_u(pb + PE_LIVE)] > 0:
                again = True  # an awake CE
    A.busy[_u((b << 1) + 1)] = active
    return pending, progressed, next_wake, active, need1, again or need1, sleepers


@hot
def _phase2(g, n_groups, t, F, I, A, sums, n_tags, max_events, W, T, n_colors, depth, cap, hop_bit, ramp_bit,
            read_ports, write_ports, skip):
    """Phase 2 for group g's tiles that are due, kicked, or (without skip) all; a tile that
    runs records its totals for the cycles it may then be skipped, and the group's sums of
    them (sums[2g]: pending, sums[2g + 1]: CEs asleep in busy or setup; _group_sums) follow.
    Returns the group's (pending, progressed, PEs on the full path)."""
    tl = A.state
    kick = A.kick.view(np.int32)  # (a tile's four flags as one word)
    due = A.due
    need1 = A.need1
    n_tiles = A.rect.shape[0] >> 2
    pending = sums[2 * g]
    asleep = sums[2 * g + 1]  # (CEs asleep in busy or setup progress this cycle unless their tile runs)
    progressed = asleep
    active = 0
    run = A.mesh[2]
    for c in range(g, -(-n_tiles // run), n_groups):
        for b in range(c * run, min(c * run + run, n_tiles)):
            if not skip or due[b] <= t or kick[b] != 0:
                kick[b] = 0
                pd, pr, wk, ac, n1, again, sleepers = _update_tile(
                    b, t, F, I, A, g, n_tags, max_events, W, T, n_colors, depth, cap, hop_bit, ramp_bit,
                    read_ports, write_ports, skip)
                tb = b * TL_FIELDS
                pending += pd - tl[tb + TL_PENDING]
                progressed += pr - tl[tb + TL_PROGRESSED]
                asleep += sleepers - tl[tb + TL_PROGRESSED]
                tl[tb + TL_PENDING] = pd
                tl[tb + TL_PROGRESSED] = sleepers
                tl[tb + TL_WAKE] = wk
                tl[tb + TL_DIRTY] = 1
                need1[b] = 1 if n1 else 0
                due[b] = t + 1 if again else wk
                active += ac
    sums[2 * g] = pending
    sums[2 * g + 1] = asleep
    return pending, progressed, active


@hot
def _group_sums(g, n_groups, A, sums):
    """sums[2g], sums[2g + 1]: group g's tiles' pending and CEs asleep in busy or setup, as
    recorded (phase 2 keeps them up to date from then on)."""
    tl = A.state
    n_tiles = A.rect.shape[0] >> 2
    run = A.mesh[2]
    pending = 0
    asleep = 0
    for c in range(g, -(-n_tiles // run), n_groups):
        for b in range(c * run, min(c * run + run, n_tiles)):
            pending += tl[b * TL_FIELDS + TL_PENDING]
            asleep += tl[b * TL_FIELDS + TL_PROGRESSED]
    sums[2 * g] = pending
    sums[2 * g + 1] = asleep


@hot
def _first_wake(A):
    """The earliest wake-up of a sleeping CE any tile recorded (NEVER if none)."""
    tl = A.state
    first = NEVER
    for b in range(A.rect.shape[0] >> 2):
        w = tl[b * TL_FIELDS + TL_WAKE]
        if w < first:
            first = w
    return first


def _make_run(parallel: bool):
    loop = prange if parallel else range

    def run_cycles(t, t_stop, last_progress, watchdog, F, I, A, n_tags, max_events, n_groups, W, T,
                   n_colors, depth, cap, hop_latency, ramp_latency, read_ports, write_ports, skip):
        """Step cycles t .. t_stop-1. Returns (next cycle, stop code or RUNNING, last progress).

        F holds the flat state arrays (state.Flat), I the instrumentation (state.Ins: per-group
        tag statistics and the event log of traced PEs), A the tiles (state.Tiles). Group g steps
        runs g, g + n_groups, ... of A.mesh[2] consecutive tiles: groups run in parallel in the
        parallel kernel, and interleaving spreads busy parts of the mesh over all threads (any
        partition gives identical results). With skip, a tile runs phase 1 only when a PE of it has a wavelet
        ready or a grant to clear, and phase 2 only then, when something is in flight or a CE
        is awake in it, when a sleeping CE's wake-up time has come, or when a neighbour's grant
        kicks it; otherwise its PEs would all be skipped as quiet, and the tile's totals
        (pending, CEs asleep in busy or setup, first wake-up) are those it recorded when it went
        quiet.
        """
        granted = np.zeros(n_groups, dtype=np.int64)
        evaluated = np.zeros(n_groups, dtype=np.int64)
        pending = np.zeros(n_groups, dtype=np.int64)
        progressed = np.zeros(n_groups, dtype=np.int64)
        active = np.zeros(n_groups, dtype=np.int64)
        sums = np.zeros(2 * n_groups, dtype=np.int64)
        for g in loop(n_groups):
            _group_sums(g, n_groups, A, sums)
        hop_bit = 1 << (hop_latency - 1)
        ramp_bit = 1 << (ramp_latency - 1)
        while t < t_stop:
            for g in loop(n_groups):
                granted[g], evaluated[g] = _phase1(g, n_groups, F, A, W, depth, cap, skip)
            for g in loop(n_groups):
                pending[g], progressed[g], active[g] = _phase2(
                    g, n_groups, t, F, I, A, sums, n_tags, max_events, W, T, n_colors, depth, cap, hop_bit,
                    ramp_bit, read_ports, write_ports, skip)
            moved = granted.sum() + progressed.sum() > 0
            if moved:
                last_progress = t
            I.work[0] += active.sum()
            I.work[1] += 1
            t += 1
            if pending.sum() == 0:
                return t, STOP_COMPLETE, last_progress
            if skip and evaluated.sum() == 0 and active.sum() == 0:
                # every PE is quiet: nothing happens before the first CE wakes (setup sleepers
                # make progress every cycle meanwhile); with none, only the watchdog remains
                first = _first_wake(A)
                if first < NEVER:
                    target = min(first, t_stop)
                    if moved:
                        last_progress = target - 1
                else:
                    target = max(t, min(last_progress + watchdog + 1, t_stop))
                I.work[2] += target - t
                t = target
            if t - 1 - last_progress >= watchdog:
                return t, STOP_DEADLOCK, last_progress
        return t, RUNNING, last_progress

    return run_cycles


run_cycles_serial = njit(cache=True)(_make_run(False))
# fusion off: Numba would otherwise merge the two phase loops into one, and a group's phase 2
# would run before another group's phase 1 of the same cycle (the phases need a barrier)
run_cycles_parallel = njit(cache=True, parallel={"fusion": False})(_make_run(True))
