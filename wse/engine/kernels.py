"""Numba kernels: the two-phase cycle of docs/model.md over packed per-PE records.

Phase 1 reads only last cycle's state and writes each PE's own grant mask, round-robin pointer
and link counters. Phase 2 runs each PE's CE step and queue update, reading neighbours' grants
and writing only that PE's records. Each phase is a loop over PEs (`prange` in the parallel
kernel, integer-sum reductions only), so results do not depend on the thread count. Kernels
import only numpy, numba and integer constants (ISA codes and record layouts).

The state arrives as flat 1-D arrays (layout.py gives the record fields; route, queue and
thread records have 8 fields, so a field's index is base + (slot << 3) + FIELD, PE records 16,
base p << PSHIFT) and every index is cast to uint64
at the point of use: Numba then emits a plain load, without the negative-index wraparound and
runtime-stride multiplications it adds for signed, multi-dimensional indexing.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..isa import (
    C_BUSY, C_SETUP, C_STALL_RECV, C_STALL_SEND, C_STALL_SRAM, C_STALL_SYNC, L_BLOCKED, L_WAVELETS, OP_COMPUTE,
    L_CONTENTION, MAX_SEMAPHORES, OP_SIGNAL, OP_WAIT, PORT_RAMP, STOP_COMPLETE, STOP_DEADLOCK,
)
from .layout import (
    A_FLOPS, A_OPS, A_RECEIVED, A_SENT, A_SRAM_READ, A_SRAM_WRITE, CODE_DONE, CQ_OCC, CQ_PIPE,
    CQ_READY, CTRL_CODE, CTRL_SUB, CTRL_TWO, OT_CIN, OT_COUT, OT_CTRL, OT_FIELDS, OT_FLOPS, OT_LENGTH,
    OT_RBYTES, OT_RECV, OT_SEND, OT_SETUP, OT_TAG, OT_WBYTES, OT_WIDTH, TS_BYTES, TS_FIELDS, TS_FIRST, TS_FLOPS,
    TS_LAST, TS_OPS, TS_WAVELETS, EVENT_FIELDS, PE_GRANT, PE_LIVE, PE_PEAK,
    PE_CE_RR, PE_HELD, PE_INFLIGHT, PE_READY, PE_ROUTES, PE_RR, PE_RXMASK, PE_SLEEP_CLASS, PE_SLEEP_THREAD, PE_TRACE, Q_GRANTS, Q_OCC, Q_PIPE, Q_READY, RT_DOWNQ, RT_DOWNS, RT_INC, RT_RX, RT_TX, RT_UP, RT_UP_PE, TH_CTRL,
    TH_END, TH_IN, TH_LEFT, TH_OP, TH_OUT, TH_SETUP, TH_WIDTH,
)

RUNNING = -1  # returned when the chunk ended before the run did
NEVER = 1 << 62  # a wake-up time that never comes
PSHIFT = 4  # PE records have 16 fields


@njit(cache=True, inline="always")
def _u(i):
    """An index as uint64: no wraparound code (all indices here are non-negative)."""
    return np.uint64(i)


@njit(cache=True, inline="always")
def _neighbour(p, port, W):
    """PE index through link port 0..3 (north, south, east, west)."""
    if port == 0:
        return p - W
    if port == 1:
        return p + W
    if port == 2:
        return p + 1
    return p - 1


@njit(cache=True)
def _route_block(lo, hi, F, W, R, depth, cap):
    """Phase 1 for PEs lo .. hi-1: round-robin grants from last cycle's state.

    Returns (PEs that granted a route, PEs with ready wavelets). Writes only those PEs' grant
    mask, round-robin pointer, grant counts and link counters. Port use is counted in 4-bit fields of `used`
    (one per port); a route fits when no field of used + its RT_INC exceeds `cap`.
    """
    rt = F.rt
    q = F.q
    pe = F.pe
    link_acc = F.link_acc
    P = F.finish.shape[0]
    rshift = 3
    # adding bias to a field sets its bit 3 exactly when the field exceeds cap (cap <= 8)
    bias = 0
    for port in range(5):
        bias |= (7 - cap) << (4 * port)
    granted = 0
    evaluated = 0
    for p in range(lo, hi):
        pb = p << PSHIFT
        nr = pe[_u(pb + PE_ROUTES)]
        if nr == 0:
            continue
        if pe[_u(pb + PE_READY)] == 0:  # nothing to forward: no grant, no link waiting
            if pe[_u(pb + PE_GRANT)] != 0:
                pe[_u(pb + PE_GRANT)] = 0
            continue
        evaluated += 1
        qb = (p * R) << rshift
        g = 0  # granted slots
        used = 0  # 4 bits of carried-wavelet count per port
        waiting = 0  # link ports with a ready wavelet that was not granted
        first = -1
        k = pe[_u(pb + PE_RR)]
        for _j in range(nr):
            kb = qb + (k << rshift)
            if q[_u(kb + Q_READY)] > 0:
                inc = rt[_u(kb + RT_INC)]
                ok = ((used + inc + bias) & (inc << 3)) == 0
                if ok and (inc >> (4 * PORT_RAMP)) != 0 and q[_u(kb + CQ_OCC)] >= depth:
                    ok = False
                if ok:
                    down = rt[_u(kb + RT_DOWNQ)]
                    if down >= 0:
                        ok = q[_u(down + Q_OCC)] < depth
                    elif down == -2:
                        slots = rt[_u(kb + RT_DOWNS)]
                        for port in range(4):
                            d = (slots >> (8 * port)) & 255
                            if d != 0:
                                nbq = (_neighbour(p, port, W) * R + d - 1) << rshift
                                if q[_u(nbq + Q_OCC)] >= depth:
                                    ok = False
                if ok:
                    g |= 1 << k
                    q[_u(kb + Q_GRANTS)] += 1
                    used += inc
                    if first < 0:
                        first = k
                else:
                    waiting |= rt[_u(kb + RT_TX)] & 15
            k += 1
            if k == nr:
                k = 0
        pe[_u(pb + PE_GRANT)] = g
        if first >= 0:
            pe[_u(pb + PE_RR)] = first + 1 if first + 1 < nr else 0
            granted += 1
        if waiting != 0:
            for port in range(4):
                if (waiting >> port) & 1:
                    if ((used >> (4 * port)) & 15) >= cap:
                        link_acc[_u(((L_CONTENTION * P + p) << 2) + port)] += 1
                    else:
                        link_acc[_u(((L_BLOCKED * P + p) << 2) + port)] += 1
    return granted, evaluated


@njit(cache=True)
def _update_block(lo, hi, t, F, I, blk, n_tags, max_events, W, R, T, n_colors, depth, cap, hop_bit,
                  ramp_bit, read_ports, write_ports, skip):
    """Phase 2 for PEs lo .. hi-1: CE step, then queue update.

    Returns (wavelets held + live threads, PEs that progressed, earliest wake-up of a sleeping
    CE, PEs that took the full path). Reads neighbours' grants; writes only these PEs' records.

    Exact skipping (skip=True): a CE whose threads all stall or count down setup sleeps until
    the first setup ends or a wavelet arrives in one of its CE queues or leaves one of its
    ramp-fed router queues, the only events that can change what it does; the cycles it
    sleeps are added to the class it was in (all that could have happened). A CE whose one
    progressing thread computes from SRAM alone sleeps through the run of local compute ops
    ahead of it (_chain_end); waking replays the ops completed meanwhile (_account_sleep). A PE whose CE is
    idle or asleep, with nothing in flight, nothing granted and no neighbour granting, is
    skipped whole.
    """
    rt = F.rt
    color_slot = F.color_slot
    q = F.q
    th = F.th
    pe = F.pe
    sem = F.sem
    sem_add = F.sem_add
    cyc = F.cyc
    acc = F.acc
    finish = F.finish
    ot = F.ot
    th_start = I.th_start
    tagstat = I.tagstat
    events = I.events
    ev_count = I.ev_count
    sleep_until = F.sleep_until
    sleep_from = F.sleep_from
    P = finish.shape[0]
    rshift = 3
    pending = 0
    progressed = 0
    next_wake = NEVER
    active = 0
    for p in range(lo, hi):
        pb = p << PSHIFT
        nr = pe[_u(pb + PE_ROUTES)]
        lv = pe[_u(pb + PE_LIVE)]
        if nr == 0 and lv == 0:
            continue
        asleep = lv > 0 and sleep_until[_u(p)] > t
        if skip and (lv == 0 or asleep) and pe[_u(pb + PE_GRANT)] == 0 and pe[_u(pb + PE_INFLIGHT)] == 0:
            quiet = True
            mask = pe[_u(pb + PE_RXMASK)]
            for port in range(4):
                if (mask >> port) & 1 and pe[_u((_neighbour(p, port, W) << PSHIFT) + PE_GRANT)] != 0:
                    quiet = False
            if quiet:
                if asleep:
                    if pe[_u(pb + PE_SLEEP_CLASS)] <= C_SETUP:  # busy or setup: progress
                        progressed += 1
                    w = sleep_until[_u(p)]
                    if w < next_wake:
                        next_wake = w
                pending += pe[_u(pb + PE_HELD)] + lv
                continue
        active += 1
        qb = (p * R) << rshift
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
                _wake(p, t, T, blk, F, I, n_tags, max_events, n_colors)
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
            first = -1  # the first thread that took a step
            for _j in range(T):
                if first < 0 and busy:
                    first = h - 1 if h > 0 else T - 1
                hb = (p * T + h) << rshift
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
                        _complete_op(p, h, t, blk, F, I, n_tags, max_events, T, n_colors)
                h += 1
                if h == T:
                    h = 0
            if first < 0 and busy:
                first = h - 1 if h > 0 else T - 1
            if first >= 0:
                pe[_u(pb + PE_CE_RR)] = first + 1 if first + 1 < T else 0
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
                    until = _chain_end(p, ff_h, t, T, th, ot)
                    if setup and t + 1 + min_setup < until:
                        until = t + 1 + min_setup
                    pe[_u(pb + PE_SLEEP_THREAD)] = ff_h
                if until > t + 1:
                    sleep_until[_u(p)] = until
                    sleep_from[_u(p)] = t + 1
                    pe[_u(pb + PE_SLEEP_CLASS)] = cls

        # step 2: queue update (arrivals, latency, departures)
        held = 0
        if nr > 0:
            g = pe[_u(pb + PE_GRANT)]
            top = 0
            ready_sum = 0
            inflight = 0
            woke = False
            for k in range(nr):
                kb = qb + (k << rshift)
                pipe = q[_u(kb + Q_PIPE)]
                occ = q[_u(kb + Q_OCC)]
                rx = rt[_u(kb + RT_RX)]
                if rx == PORT_RAMP:
                    if (sent >> k) & 1:
                        pipe |= ramp_bit
                        occ += 1
                else:
                    us = rt[_u(kb + RT_UP)]
                    if us >= 0 and (pe[_u((rt[_u(kb + RT_UP_PE)] << PSHIFT) + PE_GRANT)] >> us) & 1:
                        pipe |= hop_bit
                        occ += 1
                cocc = q[_u(kb + CQ_OCC)]
                ready = q[_u(kb + Q_READY)]
                if pipe != 0 or (g >> k) & 1:
                    ready += pipe & 1
                    pipe >>= 1
                    if (g >> k) & 1:
                        ready -= 1
                        occ -= 1
                        if rx == PORT_RAMP:
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
                    inflight += 1
                ready_sum += ready
                if occ > top:
                    top = occ
                if cocc > top:
                    top = cocc
                held += occ + cocc
            if top > pe[_u(pb + PE_PEAK)]:
                pe[_u(pb + PE_PEAK)] = top
            pe[_u(pb + PE_READY)] = ready_sum
            pe[_u(pb + PE_INFLIGHT)] = inflight
            pe[_u(pb + PE_HELD)] = held
            if woke and sleep_until[_u(p)] > t + 1:
                sleep_until[_u(p)] = t + 1
        pending += held + pe[_u(pb + PE_LIVE)]
        if lv > 0 and sleep_until[_u(p)] > t:
            w = sleep_until[_u(p)]
            if w < next_wake:
                next_wake = w

    return pending, progressed, next_wake, active


@njit(cache=True)
def _complete_op(p, h, t, blk, F, I, n_tags, max_events, T, n_colors):
    """Thread h of PE p completed its op at cycle t: count it whole (counters, per-tag
    statistics of block blk, the PE's event log) and load its next op, which starts at t + 1."""
    th, pe, ot, acc = F.th, F.pe, F.ot, F.acc
    P = F.finish.shape[0]
    hb = (p * T + h) << 3
    op = th[_u(hb + TH_OP)]
    ob = op * OT_FIELDS
    n = ot[_u(ob + OT_LENGTH)]
    if n != 0:
        acc[_u(A_FLOPS * P + p)] += n * ot[_u(ob + OT_FLOPS)]
        acc[_u(A_SRAM_READ * P + p)] += n * ot[_u(ob + OT_RBYTES)]
        acc[_u(A_SRAM_WRITE * P + p)] += n * ot[_u(ob + OT_WBYTES)]
        acc[_u(A_SENT * P + p)] += n * ot[_u(ob + OT_SEND)]
        acc[_u(A_RECEIVED * P + p)] += n * ot[_u(ob + OT_RECV)]
    acc[_u(A_OPS * P + p)] += 1
    F.finish[_u(p)] = t + 1
    th_start, tagstat = I.th_start, I.tagstat
    si = _u(p * T + h)
    started = th_start[si] if th_start[si] >= 0 else t
    sb = (blk * n_tags + ot[_u(ob + OT_TAG)]) * TS_FIELDS
    if started < tagstat[_u(sb + TS_FIRST)]:
        tagstat[_u(sb + TS_FIRST)] = started
    if t + 1 > tagstat[_u(sb + TS_LAST)]:
        tagstat[_u(sb + TS_LAST)] = t + 1
    tagstat[_u(sb + TS_OPS)] += 1
    if n != 0:
        tagstat[_u(sb + TS_FLOPS)] += n * ot[_u(ob + OT_FLOPS)]
        tagstat[_u(sb + TS_BYTES)] += n * (ot[_u(ob + OT_RBYTES)] + ot[_u(ob + OT_WBYTES)])
        tagstat[_u(sb + TS_WAVELETS)] += n * (ot[_u(ob + OT_SEND)] + ot[_u(ob + OT_RECV)])
    slot = pe[_u((p << PSHIFT) + PE_TRACE)]
    if slot >= 0:
        k = I.ev_count[_u(slot)]
        if k < max_events:
            e = (slot * max_events + k) * EVENT_FIELDS
            I.events[_u(e)] = op
            I.events[_u(e + 1)] = h
            I.events[_u(e + 2)] = started
            I.events[_u(e + 3)] = t + 1
            I.ev_count[_u(slot)] = k + 1
    th_start[si] = -1
    op += 1
    th[_u(hb + TH_OP)] = op
    if op < th[_u(hb + TH_END)]:
        ob = op * OT_FIELDS
        th[_u(hb + TH_LEFT)] = ot[_u(ob + OT_LENGTH)]
        th[_u(hb + TH_SETUP)] = ot[_u(ob + OT_SETUP)]
        th[_u(hb + TH_CTRL)] = ot[_u(ob + OT_CTRL)]
        th[_u(hb + TH_WIDTH)] = ot[_u(ob + OT_WIDTH)]
        th[_u(hb + TH_IN)] = F.color_slot[_u(p * n_colors + ot[_u(ob + OT_CIN)])] if ot[_u(ob + OT_RECV)] else -1
        th[_u(hb + TH_OUT)] = F.color_slot[_u(p * n_colors + ot[_u(ob + OT_COUT)])] if ot[_u(ob + OT_SEND)] else -1
    else:
        th[_u(hb + TH_CTRL)] = CODE_DONE
        pe[_u((p << PSHIFT) + PE_LIVE)] -= 1


@njit(cache=True, inline="always")
def _local_compute(ctrl):
    """A pure local compute op: one step per cycle, no fabric operand, one SRAM substep."""
    return (ctrl & CTRL_CODE) == OP_COMPUTE and (ctrl & CTRL_TWO) == 0


@njit(cache=True)
def _chain_end(p, h, t, T, th, ot):
    """Cycle of the last step of the run of local compute ops thread h is in, the current op
    (mid-op after cycle t's step) and the following ones: each next op costs its setup and
    one cycle per step."""
    hb = (p * T + h) << 3
    width = th[_u(hb + TH_WIDTH)]
    end = t + (th[_u(hb + TH_LEFT)] + width - 1) // width
    op = th[_u(hb + TH_OP)] + 1
    stop = th[_u(hb + TH_END)]
    while op < stop:
        ob = op * OT_FIELDS
        if not _local_compute(ot[_u(ob + OT_CTRL)]):
            break
        w = ot[_u(ob + OT_WIDTH)]
        end += ot[_u(ob + OT_SETUP)] + max(1, (ot[_u(ob + OT_LENGTH)] + w - 1) // w)
        op += 1
    return end


@njit(cache=True)
def _account_sleep(p, t, T, blk, F, I, n_tags, max_events, n_colors):
    """Count the cycles a CE slept (sleep_from .. t-1) as if stepped: its class, its threads'
    setup countdowns and, asleep busy, its computing thread's steps, op completions and next
    ops' setups (a run of local compute ops, kernels._chain_end)."""
    th, pe, cyc = F.th, F.pe, F.cyc
    P = F.finish.shape[0]
    t0 = F.sleep_from[_u(p)]
    skipped = t - t0
    if skipped > 0:
        cls = pe[_u((p << PSHIFT) + PE_SLEEP_CLASS)]
        for h in range(T):
            hb = (p * T + h) << 3
            if (th[_u(hb + TH_CTRL)] & CTRL_CODE) != CODE_DONE and th[_u(hb + TH_SETUP)] > 0 and \
                    (cls != C_BUSY or h != pe[_u((p << PSHIFT) + PE_SLEEP_THREAD)]):
                th[_u(hb + TH_SETUP)] -= skipped
        if cls != C_BUSY:
            cyc[_u(cls * P + p)] += skipped
        else:
            h = pe[_u((p << PSHIFT) + PE_SLEEP_THREAD)]
            hb = (p * T + h) << 3
            si = _u(p * T + h)
            busy = 0
            setup = 0
            c = t0  # next cycle to account
            while c < t:
                left_setup = th[_u(hb + TH_SETUP)]
                if left_setup > 0:
                    k = min(left_setup, t - c)
                    th[_u(hb + TH_SETUP)] = left_setup - k
                    setup += k
                    c += k
                    continue
                if I.th_start[si] < 0:
                    I.th_start[si] = c
                width = th[_u(hb + TH_WIDTH)]
                steps = max(1, (th[_u(hb + TH_LEFT)] + width - 1) // width)
                if c + steps <= t:  # the op's last step falls inside the sleep: replay it
                    busy += steps
                    c += steps
                    th[_u(hb + TH_LEFT)] = 0
                    _complete_op(p, h, c - 1, blk, F, I, n_tags, max_events, T, n_colors)
                else:
                    th[_u(hb + TH_LEFT)] -= (t - c) * width
                    busy += t - c
                    c = t
            cyc[_u(C_BUSY * P + p)] += busy
            cyc[_u(C_SETUP * P + p)] += setup
    F.sleep_from[_u(p)] = t


@njit(cache=True)
def _wake(p, t, T, blk, F, I, n_tags, max_events, n_colors):
    """Wake a sleeping CE at cycle t."""
    _account_sleep(p, t, T, blk, F, I, n_tags, max_events, n_colors)
    F.sleep_until[_u(p)] = 0


@njit(cache=True)
def fold(t, F, I, n_tags, max_events, T, n_colors, pe_cnt, link_cnt, tx):
    """End of a chunk: sleeping CEs accounted up to t (they stay asleep), then the 32-bit
    per-chunk counters added into the 64-bit totals pe_cnt [P, classes..] and link_cnt
    [P, 4, link counters] and cleared. Wavelets per link come from the slots' grant counts."""
    P = F.finish.shape[0]
    R = tx.shape[1]
    n_cls = F.cyc.shape[0] // P
    n_link = F.link_acc.shape[0] // (P * 4)
    for p in range(P):
        if F.sleep_until[p] > 0:
            _account_sleep(p, t, T, 0, F, I, n_tags, max_events, n_colors)
        for c in range(n_cls):
            pe_cnt[p, c] += F.cyc[c * P + p]
            F.cyc[c * P + p] = 0
        for c in range(n_link):
            for port in range(4):
                i = ((c * P + p) << 2) + port
                link_cnt[p, port, c] += F.link_acc[i]
                F.link_acc[i] = 0
        for k in range(R):
            qi = ((p * R + k) << 3) + Q_GRANTS
            g = F.q[qi]
            if g != 0:
                for port in range(4):
                    if (tx[p, k] >> port) & 1:
                        link_cnt[p, port, L_WAVELETS] += g
                F.q[qi] = 0


@njit(cache=True)
def totals(F, T):
    """(FLOPs of completed ops plus the finished elements of ops in progress, wavelets held
    in all queues): the timeline's sample of the whole mesh."""
    P = F.finish.shape[0]
    flops = 0
    for p in range(P):
        flops += F.acc[A_FLOPS * P + p]
        for h in range(T):
            hb = (p * T + h) << 3
            if (F.th[hb + TH_CTRL] & CTRL_CODE) != CODE_DONE:
                ob = F.th[hb + TH_OP] * OT_FIELDS
                flops += (F.ot[ob + OT_LENGTH] - F.th[hb + TH_LEFT]) * F.ot[ob + OT_FLOPS]
    held = 0
    for i in range(0, F.q.shape[0], 8):
        held += F.q[i + Q_OCC] + F.q[i + CQ_OCC]
    return flops, held


def _make_run(parallel: bool):
    loop = prange if parallel else range

    def run_cycles(t, t_stop, last_progress, watchdog, F, I, n_tags, max_events, blocks, n_groups, W, R, T,
                   n_colors, depth, cap, hop_latency, ramp_latency, read_ports, write_ports, skip):
        """Step cycles t .. t_stop-1. Returns (next cycle, stop code or RUNNING, last progress).

        F holds the flat state arrays (state.Flat), I the instrumentation (state.Ins: per-block
        tag statistics and the event log of traced PEs); blocks[b] .. blocks[b+1] are the PE ranges
        stepped as one unit. Group g steps blocks g, g + n_groups, ...: groups run in parallel in
        the parallel kernel, and interleaving spreads busy parts of the mesh over all threads
        (any partition gives identical results).
        """
        n_blocks = blocks.shape[0] - 1
        granted = np.zeros(n_blocks, dtype=np.int64)
        evaluated = np.zeros(n_blocks, dtype=np.int64)
        pending = np.zeros(n_blocks, dtype=np.int64)
        progressed = np.zeros(n_blocks, dtype=np.int64)
        wake = np.zeros(n_blocks, dtype=np.int64)
        active = np.zeros(n_blocks, dtype=np.int64)
        hop_bit = 1 << (hop_latency - 1)
        ramp_bit = 1 << (ramp_latency - 1)
        while t < t_stop:
            for g in loop(n_groups):
                for b in range(g, n_blocks, n_groups):
                    granted[b], evaluated[b] = _route_block(blocks[b], blocks[b + 1], F, W, R, depth, cap)
            for g in loop(n_groups):
                for b in range(g, n_blocks, n_groups):
                    pending[b], progressed[b], wake[b], active[b] = _update_block(
                        blocks[b], blocks[b + 1], t, F, I, b, n_tags, max_events, W, R, T, n_colors, depth,
                        cap, hop_bit, ramp_bit, read_ports, write_ports, skip)
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
                first = wake.min()
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
run_cycles_parallel = njit(cache=True, parallel=True)(_make_run(True))
