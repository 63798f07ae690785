"""Compiled passes over a trace's tables, run once per trace before it is simulated: the distinct
rows of packed op words (op_codes.distinct_ops), the routes ordered by PE and color, and whether
any route breaks a rule (trace_check names which). Each replaces several whole-array numpy
passes whose temporaries cost more than the work: a Kimi K2 group stage has 1.7 M routes and a
layer-pair stage 3.5 M ops, checked and coded once per simulation."""
from __future__ import annotations

import numpy as np
from numba import njit

from .. import isa

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)
DX = np.array(isa.PORT_DX[:isa.N_LINK_PORTS], dtype=np.int64)  # a link port's step in x and y
DY = np.array(isa.PORT_DY[:isa.N_LINK_PORTS], dtype=np.int64)
_OPP = np.array(isa.PORT_OPPOSITE[:isa.N_LINK_PORTS], dtype=np.int64)


@njit(cache=True)
def or_column(words: np.ndarray, col: np.ndarray, idx: np.ndarray, lo: int, width: int) -> None:
    """words[i] = words[i] << width | (col[idx[i]] - lo) (col[i] where idx is empty)."""
    s = np.uint64(width)
    if len(idx):
        for i in range(len(words)):
            words[i] = (words[i] << s) | np.uint64(np.int64(col[idx[i]]) - lo)
    else:
        for i in range(len(words)):
            words[i] = (words[i] << s) | np.uint64(np.int64(col[i]) - lo)


@njit(cache=True)
def _hash(words: np.ndarray, i: int) -> np.uint64:
    h = np.uint64(0)
    for k in range(words.shape[0]):
        h = (h ^ words[k, i]) * _HASH_MUL
        h ^= h >> np.uint64(29)
    return h


@njit(cache=True)
def distinct_rows(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of uint64 words [k, n] (row i: words[:, i]) by hashing: (the first index of
    each, in order of first appearance; each row's id in that order). One pass; the table grows
    with the distinct rows."""
    n = words.shape[1]
    inverse = np.empty(n, dtype=np.int64)
    cap = 1024
    table = np.full(cap, -1, dtype=np.int64)  # open addressing: id of the distinct row, -1 empty
    first = np.empty(1024, dtype=np.int64)
    found = 0
    for i in range(n):
        if 2 * (found + 1) > cap:  # keep the load below one half
            cap *= 2
            table = np.full(cap, -1, dtype=np.int64)
            for u in range(found):
                j = np.int64(_hash(words, first[u]) & np.uint64(cap - 1))
                while table[j] >= 0:
                    j = (j + 1) & (cap - 1)
                table[j] = u
        j = np.int64(_hash(words, i) & np.uint64(cap - 1))
        while True:
            u = table[j]
            if u < 0:
                if found == len(first):
                    grown = np.empty(2 * len(first), dtype=np.int64)
                    grown[:found] = first[:found]
                    first = grown
                first[found] = i
                table[j] = found
                inverse[i] = found
                found += 1
                break
            r = first[u]
            same = True
            for k in range(words.shape[0]):
                if words[k, r] != words[k, i]:
                    same = False
                    break
            if same:
                inverse[i] = u
                break
            j = (j + 1) & (cap - 1)
    return first[:found].copy(), inverse


@njit(cache=True)
def pe_starts(pe: np.ndarray, n_pes: int) -> np.ndarray:
    """int64 [n_pes + 1]: where each PE's routes start among routes ordered by PE (a count and
    a running sum)."""
    start = np.zeros(n_pes + 1, dtype=np.int64)
    for i in range(len(pe)):
        if pe[i] < 0 or pe[i] >= n_pes:  # (callers check first; never index out of bounds)
            raise IndexError("a route's PE is outside the mesh")
        start[pe[i] + 1] += 1
    for p in range(n_pes):
        start[p + 1] += start[p]
    return start


@njit(cache=True)
def route_order(pe: np.ndarray, color: np.ndarray, n_pes: int) -> np.ndarray:
    """Route indices sorted by PE, then color, equal keys in their given order (a stable sort
    of pe * 64 + color): counted by PE, then each PE's few routes insertion-sorted by color."""
    n = len(pe)
    start = pe_starts(pe, n_pes)
    fill = start[:-1].copy()
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        p = pe[i]
        order[fill[p]] = i
        fill[p] += 1
    for p in range(n_pes):
        for a in range(start[p] + 1, start[p + 1]):
            v = order[a]
            b = a
            while b > start[p] and color[order[b - 1]] > color[v]:
                order[b] = order[b - 1]
                b -= 1
            order[b] = v
    return order


@njit(cache=True)
def routes_broken(pe: np.ndarray, color: np.ndarray, rx: np.ndarray, tx: np.ndarray, order: np.ndarray,
                  W: int, H: int, colors: int) -> bool:
    """Whether any route breaks a rule trace_check._validate_routes names: a color out of range,
    two routes for one PE and color, tx holding the rx port, a port off the mesh, a link port in
    tx whose neighbour has no route for the color receiving from this side. `order`: route_order."""
    n = len(order)
    start = pe_starts(pe, W * H)  # each PE's first position in order
    for a in range(n):
        i = order[a]
        c, r, t = np.int64(color[i]), np.int64(rx[i]), np.int64(tx[i])
        if c < 0 or c >= colors or (t >> r) & 1:
            return True
        if a > 0 and pe[order[a - 1]] == pe[i] and color[order[a - 1]] == c:
            return True
        x, y = pe[i] % W, pe[i] // W
        for port in range(len(DX)):
            nx, ny = x + DX[port], y + DY[port]
            off = nx < 0 or nx >= W or ny < 0 or ny >= H
            sends = (t >> port) & 1
            if off and (sends or r == port):
                return True
            if sends:
                nb = ny * W + nx
                ok = False
                for b in range(start[nb], start[nb + 1]):
                    k = order[b]
                    if color[k] == c:
                        ok = rx[k] == _OPP[port]
                        break
                if not ok:
                    return True
    return False
