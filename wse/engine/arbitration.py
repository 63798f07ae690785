"""Phase 1 of the cycle (docs/model.md): each PE's round-robin arbitration of its ready route
slots from last cycle's state, the grants' arrivals written to the neighbours they enter.

Same conventions as kernels.py (flat state arrays, layout.py's records, uint64 indices); the
stepping loop there calls _phase1 for each group of tiles.
"""
from __future__ import annotations

from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from ..isa import L_BLOCKED, L_CONTENTION, PORT_RAMP
from .accounting import PSHIFT, _u, hot
from .layout import (
    CQ_OCC, MASK32, PE_ARRIVE, PE_GRANT, PE_READY, PE_ROUTES, PE_RR, Q_GRANTS, Q_OCC, ROUTES_MASK, RT_CROSS,
    RT_DOWNQ, RT_DOWNS, RT_INC, RT_TX, SLOT_SHIFT,
)
from .prefetch import passes_pay, prefetch


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


@hot
def _route_tile(b, F, A, W, depth, cap):
    """Phase 1 for the PEs of tile b: round-robin grants from last cycle's state; where it pays
    (prefetch.passes_pay), a first pass prefetches what the PEs with ready wavelets will read.

    Returns (PEs that granted a route, PEs with ready wavelets) and keeps the latter as the
    tile's phase-1 busy count. Writes only those PEs' grant mask, round-robin pointer, grant
    counts and link counters, the arrival fields of the neighbours their grants send to (PE_ARRIVE + port: only the neighbour on that side writes it) and the kick
    flags of the tiles those lie in (one per tile and port, likewise).
    Port use is counted in 4-bit fields of `used` (one per port); a route fits when no field
    of used + its RT_INC exceeds `cap`.
    """
    x0, x1 = A.rect[_u(b << 2)], A.rect[_u((b << 2) + 1)]
    y0, y1 = A.rect[_u((b << 2) + 2)], A.rect[_u((b << 2) + 3)]
    kick = A.kick
    pe_tile = A.pe_tile
    rt = F.rt
    q = F.q
    pe = F.pe
    slot0 = F.slot0
    link_acc = F.link_acc
    P = F.finish.shape[0]
    rshift = SLOT_SHIFT
    # adding bias to a field sets its bit 3 exactly when the field exceeds cap (cap <= 8)
    bias = 0
    for port in range(5):
        bias |= (7 - cap) << (4 * port)
    granted = 0
    evaluated = 0
    y_pf = y1 if passes_pay(A.busy[_u(b << 1)], x0, x1, y0, y1) else y0
    for y in range(y0, y_pf):  # first, the downstream queues of every ready slot, misses overlapped
        for p in range(y * W + x0, y * W + x1):
            m = pe[_u((p << PSHIFT) + PE_READY)] & MASK32
            qb = slot0[_u(p)] << rshift
            while m != 0:
                down = rt[_u(qb + (trailing_zeros(m) << rshift) + RT_DOWNQ)]
                m &= m - 1
                if down >= 0:
                    prefetch(q, _u(down))
    for y in range(y0, y1):
        for p in range(y * W + x0, y * W + x1):
            pb = p << PSHIFT
            nr = pe[_u(pb + PE_ROUTES)] & ROUTES_MASK
            if nr == 0:
                continue
            ready = pe[_u(pb + PE_READY)] & MASK32
            if ready == 0:  # nothing to forward: no grant, no link waiting
                if pe[_u(pb + PE_GRANT)] != 0:
                    pe[_u(pb + PE_GRANT)] = 0
                continue
            evaluated += 1
            qb = slot0[_u(p)] << rshift
            g = 0  # granted slots
            used = 0  # 4 bits of carried-wavelet count per port
            waiting = 0  # link ports with a ready wavelet that was not granted
            first = -1
            rr = pe[_u(pb + PE_RR)]
            below = (1 << rr) - 1
            for half in range(2):  # ready slots in round-robin order: rr .. nr-1, then 0 .. rr-1
                m = ready & ~below if half == 0 else ready & below
                while m != 0:
                    k = trailing_zeros(m)
                    m &= m - 1
                    kb = qb + (k << rshift)
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
                                    nbq = (slot0[_u(_neighbour(p, port, W))] + d - 1) << rshift
                                    if q[_u(nbq + Q_OCC)] >= depth:
                                        ok = False
                    if ok:
                        g |= 1 << k
                        q[_u(kb + Q_GRANTS)] += 1
                        used += inc
                        slots = rt[_u(kb + RT_DOWNS)]
                        if slots != 0:  # tell each neighbour which of its slots receives
                            for port in range(4):
                                d = (slots >> (8 * port)) & 255
                                if d != 0:
                                    nb = _neighbour(p, port, W)
                                    pe[_u((nb << PSHIFT) + PE_ARRIVE + port)] |= 1 << (d - 1)
                            cross = rt[_u(kb + RT_CROSS)]
                            if cross != 0:  # and wake the tiles this wavelet enters
                                for port in range(4):
                                    if (cross >> port) & 1:
                                        kick[_u((pe_tile[_u(_neighbour(p, port, W))] << 2) + port)] = 1
                        if first < 0:
                            first = k
                    else:
                        waiting |= rt[_u(kb + RT_TX)] & 15
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
    A.busy[_u(b << 1)] = evaluated
    return granted, evaluated


@hot
def _phase1(g, n_groups, F, A, W, depth, cap, skip):
    """Phase 1 for group g's tiles (those with a ready wavelet or a grant to clear, or all
    without skip): (PEs that granted, PEs evaluated)."""
    need1 = A.need1
    n_tiles = A.rect.shape[0] >> 2
    granted = 0
    evaluated = 0
    run = A.mesh[2]
    for c in range(g, -(-n_tiles // run), n_groups):
        for b in range(c * run, min(c * run + run, n_tiles)):
            if not skip or need1[b] != 0:
                a, e = _route_tile(b, F, A, W, depth, cap)
                granted += a
                evaluated += e
    return granted, evaluated
