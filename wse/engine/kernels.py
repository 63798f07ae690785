"""Numba kernels: the two-phase cycle of docs/model.md over packed per-PE records.

Phase 1 reads only last cycle's state and writes each PE's own grant mask, round-robin pointer
and link counters. Phase 2 runs each PE's CE step and queue update, reading neighbours' grants
and writing only that PE's records. Each phase is a loop over PEs (`prange` in the parallel
kernel, integer-sum reductions only), so results do not depend on the thread count. Kernels
import only numpy, numba and integer constants (ISA codes and record layouts).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..isa import (
    C_BUSY, C_FLOPS, C_OPS, C_RECEIVED, C_SENT, C_SETUP, C_SRAM_READ, C_SRAM_WRITE,
    C_STALL_RECV, C_STALL_SEND, C_STALL_SRAM, C_STALL_SYNC, L_BLOCKED, L_CONTENTION,
    L_WAVELETS, OP_SIGNAL, OP_WAIT, PORT_RAMP, STOP_COMPLETE, STOP_DEADLOCK,
)
from .layout import (
    CQ_OCC, CQ_PIPE, CQ_READY, OT_CIN, OT_CODE, OT_COUT, OT_FLOPS, OT_LENGTH, OT_NSUB,
    OT_RBYTES, OT_RD_FIRST, OT_RD_LAST, OT_RECV, OT_SEM, OT_SEND, OT_SETUP, OT_WBYTES,
    OT_WIDTH, OT_WR, PE_GRANT, PE_LIVE, PE_PEAK, PE_ROUTES, PE_RR, Q_OCC, Q_PIPE, Q_READY,
    RT_DOWN, RT_RX, RT_TX, RT_UP, TH_CODE, TH_END, TH_IN, TH_LEFT, TH_NSUB, TH_OP, TH_OUT,
    TH_RD_FIRST, TH_RD_LAST, TH_SEM, TH_SETUP, TH_SUB, TH_WIDTH, TH_WR,
)

RUNNING = -1  # returned when the chunk ended before the run did


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


def _make_run(parallel: bool):
    loop = prange if parallel else range

    def run_cycles(t, t_stop, last_progress, watchdog, S, ot, W, T, depth, cap,
                   hop_latency, ramp_latency, read_ports, write_ports):
        """Step cycles t .. t_stop-1. Returns (next cycle, stop code or RUNNING, last progress).

        The per-PE bodies are written inline: calling helpers with the state tuple would copy
        and reference-count every array per call.
        """
        rt = S.rt
        color_slot = S.color_slot
        q = S.q
        th = S.th
        pe = S.pe
        sem = S.sem
        sem_add = S.sem_add
        acc = S.acc
        link_acc = S.link_acc
        finish = S.finish
        n_sem = sem.shape[1]
        P = pe.shape[0]
        hop_bit = 1 << (hop_latency - 1)
        ramp_bit = 1 << (ramp_latency - 1)
        while t < t_stop:
            # ---- phase 1: router arbitration from last cycle's state ----------------------
            granted = 0
            for p in loop(P):
                nr = pe[p, PE_ROUTES]
                if nr == 0:
                    continue
                g = 0  # granted slots
                used = 0  # 4 bits of carried-wavelet count per port
                waiting = 0  # link ports with a ready wavelet that was not granted
                first = -1
                k = pe[p, PE_RR]
                for _j in range(nr):
                    if q[p, k, Q_READY] > 0:
                        tx = rt[p, k, RT_TX]
                        ok = True
                        for port in range(5):
                            if (tx >> port) & 1:
                                if ((used >> (4 * port)) & 15) >= cap:
                                    ok = False
                                elif port == PORT_RAMP:
                                    if q[p, k, CQ_OCC] >= depth:
                                        ok = False
                                elif q[_neighbour(p, port, W), rt[p, k, RT_DOWN + port], Q_OCC] >= depth:
                                    ok = False
                        if ok:
                            g |= 1 << k
                            for port in range(5):
                                if (tx >> port) & 1:
                                    used += 1 << (4 * port)
                            if first < 0:
                                first = k
                        else:
                            waiting |= tx & 15
                    k += 1
                    if k == nr:
                        k = 0
                pe[p, PE_GRANT] = g
                if first >= 0:
                    pe[p, PE_RR] = first + 1 if first + 1 < nr else 0
                    granted += 1
                if used != 0 or waiting != 0:
                    for port in range(4):
                        carried = (used >> (4 * port)) & 15
                        if carried:
                            link_acc[L_WAVELETS, p, port] += carried
                        if (waiting >> port) & 1:
                            if carried >= cap:
                                link_acc[L_CONTENTION, p, port] += 1
                            else:
                                link_acc[L_BLOCKED, p, port] += 1

            # ---- phase 2: each PE updates its own state -------------------------------------
            pending = 0
            progressed = 0
            th0 = t % T
            for p in loop(P):
                nr = pe[p, PE_ROUTES]
                lv = pe[p, PE_LIVE]
                if nr == 0 and lv == 0:
                    continue
                # step 1: the CE's microthreads
                sent = 0  # slots injected into this cycle
                if lv > 0:
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
                    h = th0
                    for _j in range(T):
                        op = th[p, h, TH_OP]
                        if op < th[p, h, TH_END]:
                            done = False
                            if th[p, h, TH_SETUP] > 0:
                                th[p, h, TH_SETUP] -= 1
                                setup = True
                            else:
                                code = th[p, h, TH_CODE]
                                if code == OP_SIGNAL:
                                    sem_add[p, th[p, h, TH_SEM]] += 1
                                    signalled = True
                                    busy = True
                                    done = True
                                elif code == OP_WAIT:
                                    s = th[p, h, TH_SEM]
                                    if sem[p, s] > 0:
                                        sem[p, s] -= 1
                                        busy = True
                                        done = True
                                    else:
                                        st_sync = True
                                else:
                                    sub = th[p, h, TH_SUB]
                                    if sub + 1 < th[p, h, TH_NSUB]:
                                        # a non-last substep: reads only
                                        if th[p, h, TH_RD_FIRST] > rd:
                                            st_sram = True
                                        else:
                                            rd -= th[p, h, TH_RD_FIRST]
                                            th[p, h, TH_SUB] = sub + 1
                                            busy = True
                                    else:
                                        islot = th[p, h, TH_IN]
                                        oslot = th[p, h, TH_OUT]
                                        need_r = th[p, h, TH_RD_LAST]
                                        need_w = th[p, h, TH_WR]
                                        if islot >= 0 and q[p, islot, CQ_READY] == 0:
                                            st_recv = True
                                        elif oslot >= 0 and (q[p, oslot, Q_OCC] >= depth or ramp == 0
                                                             or (sent >> oslot) & 1):
                                            st_send = True
                                        elif need_r > rd or need_w > wr:
                                            st_sram = True
                                        else:
                                            rd -= need_r
                                            wr -= need_w
                                            busy = True
                                            th[p, h, TH_SUB] = 0
                                            n = th[p, h, TH_WIDTH]
                                            left = th[p, h, TH_LEFT]
                                            if n > left:
                                                n = left
                                            th[p, h, TH_LEFT] = left - n
                                            f = ot[op, OT_FLOPS]
                                            if f != 0:
                                                acc[C_FLOPS, p] += n * f
                                            b = ot[op, OT_RBYTES]
                                            if b != 0:
                                                acc[C_SRAM_READ, p] += n * b
                                            b = ot[op, OT_WBYTES]
                                            if b != 0:
                                                acc[C_SRAM_WRITE, p] += n * b
                                            if islot >= 0:
                                                q[p, islot, CQ_READY] -= 1
                                                q[p, islot, CQ_OCC] -= 1
                                                acc[C_RECEIVED, p] += 1
                                            if oslot >= 0:
                                                sent |= 1 << oslot
                                                ramp -= 1
                                                acc[C_SENT, p] += 1
                                            done = left == n
                            if done:
                                # the op completed at cycle t; the next one starts at t + 1
                                acc[C_OPS, p] += 1
                                finish[p] = t + 1
                                op += 1
                                th[p, h, TH_OP] = op
                                th[p, h, TH_SUB] = 0
                                if op < th[p, h, TH_END]:
                                    th[p, h, TH_LEFT] = ot[op, OT_LENGTH]
                                    th[p, h, TH_SETUP] = ot[op, OT_SETUP]
                                    th[p, h, TH_CODE] = ot[op, OT_CODE]
                                    th[p, h, TH_SEM] = ot[op, OT_SEM]
                                    th[p, h, TH_NSUB] = ot[op, OT_NSUB]
                                    th[p, h, TH_RD_FIRST] = ot[op, OT_RD_FIRST]
                                    th[p, h, TH_RD_LAST] = ot[op, OT_RD_LAST]
                                    th[p, h, TH_WR] = ot[op, OT_WR]
                                    th[p, h, TH_WIDTH] = ot[op, OT_WIDTH]
                                    th[p, h, TH_IN] = color_slot[p, ot[op, OT_CIN]] if ot[op, OT_RECV] else -1
                                    th[p, h, TH_OUT] = color_slot[p, ot[op, OT_COUT]] if ot[op, OT_SEND] else -1
                                else:
                                    pe[p, PE_LIVE] -= 1
                        h += 1
                        if h == T:
                            h = 0
                    if signalled:
                        for s in range(n_sem):
                            sem[p, s] += sem_add[p, s]
                            sem_add[p, s] = 0
                    if busy:
                        acc[C_BUSY, p] += 1
                        progressed += 1
                    elif setup:
                        acc[C_SETUP, p] += 1
                        progressed += 1
                    elif st_sram:
                        acc[C_STALL_SRAM, p] += 1
                    elif st_recv:
                        acc[C_STALL_RECV, p] += 1
                    elif st_send:
                        acc[C_STALL_SEND, p] += 1
                    elif st_sync:
                        acc[C_STALL_SYNC, p] += 1

                # step 2: queue update (arrivals, latency, departures)
                held = 0
                if nr > 0:
                    g = pe[p, PE_GRANT]
                    top = 0
                    for k in range(nr):
                        pipe = q[p, k, Q_PIPE]
                        occ = q[p, k, Q_OCC]
                        rx = rt[p, k, RT_RX]
                        if rx == PORT_RAMP:
                            if (sent >> k) & 1:
                                pipe |= ramp_bit
                                occ += 1
                        else:
                            us = rt[p, k, RT_UP]
                            if us >= 0 and (pe[_neighbour(p, rx, W), PE_GRANT] >> us) & 1:
                                pipe |= hop_bit
                                occ += 1
                        cocc = q[p, k, CQ_OCC]
                        if pipe != 0 or (g >> k) & 1:
                            ready = q[p, k, Q_READY] + (pipe & 1)
                            pipe >>= 1
                            if (g >> k) & 1:
                                ready -= 1
                                occ -= 1
                                if (rt[p, k, RT_TX] >> PORT_RAMP) & 1:
                                    q[p, k, CQ_PIPE] |= ramp_bit
                                    cocc += 1
                                    q[p, k, CQ_OCC] = cocc
                            q[p, k, Q_READY] = ready
                            q[p, k, Q_PIPE] = pipe
                            q[p, k, Q_OCC] = occ
                        cpipe = q[p, k, CQ_PIPE]
                        if cpipe != 0:
                            q[p, k, CQ_READY] += cpipe & 1
                            q[p, k, CQ_PIPE] = cpipe >> 1
                        if occ > top:
                            top = occ
                        if cocc > top:
                            top = cocc
                        held += occ + cocc
                    if top > pe[p, PE_PEAK]:
                        pe[p, PE_PEAK] = top
                pending += held + pe[p, PE_LIVE]

            if granted + progressed > 0:
                last_progress = t
            t += 1
            if pending == 0:
                return t, STOP_COMPLETE, last_progress
            if t - 1 - last_progress >= watchdog:
                return t, STOP_DEADLOCK, last_progress
        return t, RUNNING, last_progress

    return run_cycles


run_cycles_serial = njit(cache=True)(_make_run(False))
run_cycles_parallel = njit(cache=True, parallel=True)(_make_run(True))
