"""Op completion and sleep accounting shared by the stepping kernels (kernels.py): counting a
completed op whole, replaying the cycles a CE slept, and the end-of-chunk fold and totals.

Same conventions as kernels.py: flat state arrays, records of 8 (threads) and 16 (PEs)
fields, every index cast to uint64 at the point of use.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..isa import C_BUSY, C_SETUP, L_WAVELETS, OP_COMPUTE
from .layout import (
    A_FLOPS, A_OPS, A_RECEIVED, A_SENT, A_SRAM_READ, A_SRAM_WRITE, CODE_DONE, CTRL_CODE, CTRL_TWO,
    EVENT_FIELDS, OT_CIN, OT_COUT, OT_CTRL, OT_FIELDS, OT_FLOPS, OT_LENGTH, OT_RBYTES, OT_RECV, OT_SEND,
    OT_SETUP, OT_TAG, OT_WBYTES, OT_WIDTH, PE_HELD, PE_LIVE, PE_ROUTES, Q_GRANTS, RT_TX, TL_DIRTY, TL_FIELDS, TL_FLOPS, TL_HELD,
    TL_PROGRESSED, PE_SLEEP_CLASS, PE_SLEEP_THREAD, PE_TRACE, SLOT_SHIFT, ROUTES_MASK, SPAN_SHIFT,
    TH_CTRL, TH_END, TH_IN, TH_LEFT, TH_OP, TH_OUT, TH_SETUP, TH_WIDTH, TS_BYTES, TS_FIELDS, TS_FIRST,
    TS_FLOPS, TS_LAST, TS_OPS, TS_WAVELETS,
)

PSHIFT = 4  # PE records have 16 fields
# Per-PE functions compile without Numba's reference counting: they allocate nothing, and the
# atomic reference counts of the state arrays they take from the Flat/Ins/Tiles tuples, on every
# call, once cost half of a run's time.
hot = njit(cache=True, _nrt=False)


@njit(cache=True, inline="always")
def _u(i):
    """An index as uint64: no wraparound code (all indices here are non-negative)."""
    return np.uint64(i)


@hot
def complete_op(p, h, t, grp, F, I, n_tags, max_events, T, n_colors):
    """Thread h of PE p completed its op at cycle t: count it whole (counters, per-tag
    statistics of group grp, the PE's event log) and load its next op, which starts at t + 1."""
    th, pe, ot, om, acc = F.th, F.pe, F.ot, F.omap, F.acc
    P = F.finish.shape[0]
    hb = (p * T + h) << 3
    op = th[_u(hb + TH_OP)]
    ob = om[_u(op)] * OT_FIELDS
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
    sb = (grp * n_tags + ot[_u(ob + OT_TAG)]) * TS_FIELDS
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
        ob = om[_u(op)] * OT_FIELDS
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
def local_compute(ctrl):
    """A pure local compute op: one step per cycle, no fabric operand, one SRAM substep."""
    return (ctrl & CTRL_CODE) == OP_COMPUTE and (ctrl & CTRL_TWO) == 0


@hot
def chain_end(p, h, t, T, th, ot, om):
    """Cycle of the last step of the run of local compute ops thread h is in, the current op
    (mid-op after cycle t's step) and the following ones: each next op costs its setup and
    one cycle per step."""
    hb = (p * T + h) << 3
    width = th[_u(hb + TH_WIDTH)]
    end = t + (th[_u(hb + TH_LEFT)] + width - 1) // width
    op = th[_u(hb + TH_OP)] + 1
    stop = th[_u(hb + TH_END)]
    while op < stop:
        ob = om[_u(op)] * OT_FIELDS
        if not local_compute(ot[_u(ob + OT_CTRL)]):
            break
        w = ot[_u(ob + OT_WIDTH)]
        end += ot[_u(ob + OT_SETUP)] + max(1, (ot[_u(ob + OT_LENGTH)] + w - 1) // w)
        op += 1
    return end


@hot
def account_sleep(p, t, T, grp, F, I, n_tags, max_events, n_colors):
    """Count the cycles a CE slept (sleep_from .. t-1) as if stepped: its class, its threads'
    setup countdowns and, asleep busy, its computing thread's steps, op completions and next
    ops' setups (a run of local compute ops, kernels.chain_end)."""
    th, pe, cyc = F.th, F.pe, F.cyc
    P = F.finish.shape[0]
    t0 = F.sleep_from[_u(p)]
    skipped = t - t0
    if skipped > 0:
        cls = pe[_u((p << PSHIFT) + PE_SLEEP_CLASS)]
        for h in range(pe[_u((p << PSHIFT) + PE_ROUTES)] >> SPAN_SHIFT):
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
                    complete_op(p, h, c - 1, grp, F, I, n_tags, max_events, T, n_colors)
                else:
                    th[_u(hb + TH_LEFT)] -= (t - c) * width
                    busy += t - c
                    c = t
            cyc[_u(C_BUSY * P + p)] += busy
            cyc[_u(C_SETUP * P + p)] += setup
    F.sleep_from[_u(p)] = t


@hot
def wake_ce(p, t, T, grp, F, I, n_tags, max_events, n_colors):
    """Wake a sleeping CE at cycle t."""
    account_sleep(p, t, T, grp, F, I, n_tags, max_events, n_colors)
    F.sleep_until[_u(p)] = 0


@hot
def fold(t, F, I, A, n_tags, max_events, T, n_colors, pe_cnt, link_cnt, region_of, region_busy, full):
    """Bring the totals up to cycle t at the end of a chunk.

    Always (the timeline's figures): busy cycles into pe_cnt [P, classes..] and region_busy
    [regions], and each tile's FLOPs and held wavelets (TL_FLOPS, TL_HELD), for the tiles
    stepped since the last fold and
    those with CEs asleep in busy or setup (accounted first, as if stepped; they stay asleep).
    When `full` (snapshots, the end of a run, and often enough that no 32-bit per-chunk
    counter overflows): every tile, every sleeping CE, and every cycle class and link counter
    into the 64-bit totals pe_cnt and link_cnt [P, 4, link counters] (wavelets per link from the
    slots' grant counts).
    """
    P = F.finish.shape[0]
    W = A.mesh[0]
    n_cls = F.cyc.shape[0] // P
    n_link = F.link_acc.shape[0] // (P * 4)
    tl = A.state
    n_tiles = A.rect.shape[0] >> 2
    for b in range(n_tiles):
        tb = b * TL_FIELDS
        if not (full or tl[tb + TL_DIRTY] != 0 or tl[tb + TL_PROGRESSED] != 0):
            continue
        tl[tb + TL_DIRTY] = 0
        x0, x1 = A.rect[b << 2], A.rect[(b << 2) + 1]
        y0, y1 = A.rect[(b << 2) + 2], A.rect[(b << 2) + 3]
        flops = 0
        held = 0
        for y in range(y0, y1):
            for p in range(y * W + x0, y * W + x1):
                routes = F.pe[(p << PSHIFT) + PE_ROUTES]
                if routes == 0:  # no route and no program: nothing was ever counted here
                    continue
                if F.sleep_until[p] > 0 and (full or F.pe[(p << PSHIFT) + PE_SLEEP_CLASS] <= C_SETUP):
                    account_sleep(p, t, T, 0, F, I, n_tags, max_events, n_colors)
                busy = F.cyc[C_BUSY * P + p]
                if busy != 0:
                    pe_cnt[p, C_BUSY] += busy
                    region_busy[region_of[p]] += busy
                    F.cyc[C_BUSY * P + p] = 0
                flops += F.acc[A_FLOPS * P + p]
                held += F.pe[(p << PSHIFT) + PE_HELD]
                for h in range(routes >> SPAN_SHIFT):  # the threads with a program
                    hb = (p * T + h) << 3
                    if (F.th[hb + TH_CTRL] & CTRL_CODE) != CODE_DONE:
                        ob = F.omap[_u(F.th[hb + TH_OP])] * OT_FIELDS
                        flops += (F.ot[ob + OT_LENGTH] - F.th[hb + TH_LEFT]) * F.ot[ob + OT_FLOPS]
                if full:
                    for c in range(n_cls):
                        pe_cnt[p, c] += F.cyc[c * P + p]
                        F.cyc[c * P + p] = 0
                    for c in range(n_link):
                        for port in range(4):
                            i = ((c * P + p) << 2) + port
                            link_cnt[p, port, c] += F.link_acc[i]
                            F.link_acc[i] = 0
                    for k in range(routes & ROUTES_MASK):
                        qi = ((F.slot0[p] + k) << SLOT_SHIFT) + Q_GRANTS
                        g = F.q[qi]
                        if g != 0:
                            tx = F.rt[((F.slot0[p] + k) << SLOT_SHIFT) + RT_TX]
                            for port in range(4):
                                if (tx >> port) & 1:
                                    link_cnt[p, port, L_WAVELETS] += g
                            F.q[qi] = 0
        tl[tb + TL_FLOPS] = flops
        tl[tb + TL_HELD] = held


@hot
def totals(A):
    """(FLOPs of completed ops plus the finished elements of ops in progress, wavelets held
    in all queues) over the tiles as of the last fold: the timeline's sample of the whole mesh."""
    tl = A.state
    flops = 0
    held = 0
    for b in range(A.rect.shape[0] >> 2):
        flops += tl[b * TL_FIELDS + TL_FLOPS]
        held += tl[b * TL_FIELDS + TL_HELD]
    return flops, held
