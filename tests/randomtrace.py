"""Random small traces for differential tests: streams (unicast, multicast, forwarded chains),
vector ops with random operands, and signal/wait pairs, spread over random threads and orders,
on a randomly perturbed small wafer. Many of them deadlock on purpose (ops in a bad order);
both engines must agree on that too.
"""
from __future__ import annotations

import numpy as np

from wse import hardware, isa
from wse.trace import (Trace, TraceBuilder, compute, recv, recv_compute, recv_compute_send, send,
                       signal, wait)

DIRS = {(1, 0): isa.PORT_EAST, (-1, 0): isa.PORT_WEST, (0, 1): isa.PORT_SOUTH, (0, -1): isa.PORT_NORTH}
KINDS = [(isa.KIND_FMAC, isa.DTYPE_FP16), (isa.KIND_FMAC, isa.DTYPE_FP32), (isa.KIND_FMAC, isa.DTYPE_MIXED),
         (isa.KIND_ADD, isa.DTYPE_FP16), (isa.KIND_ADD, isa.DTYPE_FP32), (isa.KIND_MUL, isa.DTYPE_FP16),
         (isa.KIND_MAX, isa.DTYPE_FP32), (isa.KIND_MOV, isa.DTYPE_FP16), (isa.KIND_SCALE, isa.DTYPE_FP32),
         (isa.KIND_SCALE, isa.DTYPE_FP8), (isa.KIND_SCALE, isa.DTYPE_INT8), (isa.KIND_SCALE, isa.DTYPE_INT4),
         (isa.KIND_DOT, isa.DTYPE_FP16), (isa.KIND_DOT, isa.DTYPE_MIXED), (isa.KIND_EXP, isa.DTYPE_FP16),
         (isa.KIND_RSQRT, isa.DTYPE_FP32), (isa.KIND_RECIP, isa.DTYPE_FP16), (isa.KIND_SILU, isa.DTYPE_FP16),
         (isa.KIND_RMAX, isa.DTYPE_FP16), (isa.KIND_RSUM, isa.DTYPE_FP32), (isa.KIND_SUB, isa.DTYPE_FP16),
         (isa.KIND_RFIND, isa.DTYPE_MIXED), (isa.KIND_FILL, isa.DTYPE_FP16), (isa.KIND_FILL, isa.DTYPE_FP32)]


def random_config(rng: np.random.Generator) -> hardware.WaferConfig:
    base = hardware.load_preset(str(rng.choice(["tiny", "tiny2"])))
    sets = [
        f"fabric.queue_depth_wavelets={rng.integers(1, 6)}",
        f"fabric.hop_latency_cycles={rng.integers(1, 4)}",
        f"fabric.ramp_latency_cycles={rng.integers(1, 4)}",
        f"fabric.link_wavelets_per_cycle={rng.integers(1, 3)}",
        f"sram.sram_read_ports={rng.integers(1, 3)}",
        f"sram.sram_write_ports={rng.integers(1, 3)}",
        f"compute.vector_setup_cycles={rng.integers(0, 4)}",
        f"compute.fabric_setup_cycles={rng.integers(0, 4)}",
        "engine.watchdog_cycles=40",
        f"engine.max_cycles={60 if rng.random() < 0.15 else 4000}",
    ]
    return base.with_overrides(sets)


def _path(rng: np.random.Generator, src: tuple[int, int], dst: tuple[int, int]) -> list[tuple[int, int]]:
    """Dimension-ordered path (x first or y first, at random) from src to dst, inclusive."""
    (x, y), (tx, ty) = src, dst
    pts = [(x, y)]
    order = ("x", "y") if rng.random() < 0.5 else ("y", "x")
    for axis in order:
        while (x != tx) if axis == "x" else (y != ty):
            if axis == "x":
                x += 1 if tx > x else -1
            else:
                y += 1 if ty > y else -1
            pts.append((x, y))
    return pts


def _threads(rng: np.random.Generator, ops: list, T: int, spread: bool, safe: bool = False) -> list[list]:
    """A PE's ops dealt to T threads in random order (round-robin when spread), then up to two
    signal/wait pairs; safe: each signal first in one thread, its wait in another (no deadlock
    from the pair), else both anywhere."""
    ths: list[list] = [[] for _ in range(T)]
    for j, op in enumerate(rng.permutation(len(ops))):
        ths[j % T if spread else int(rng.integers(0, T))].append(ops[op])
    for _ in range(int(rng.integers(0, 3))):
        s = int(rng.integers(0, 4))
        a, w = int(rng.integers(0, T)), int(rng.integers(0, T))
        if safe:
            if a == w:
                continue
            ths[a].insert(0, signal(s))
        else:
            ths[a].insert(int(rng.integers(0, len(ths[a]) + 1)), signal(s))
        ths[w].insert(int(rng.integers(0, len(ths[w]) + 1)), wait(s))
    return ths


def random_trace(seed: int) -> tuple[Trace, hardware.WaferConfig]:
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    W, H = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    # Half the cases spread ops over many threads (mostly completing runs); the others pack
    # them into a few threads in random order (often deadlocking).
    spread = rng.random() < 0.5
    T = 8 if spread else int(rng.integers(1, 4))
    n_colors = 6
    b = TraceBuilder(W, H, T, generator="randomtrace", seed=seed)
    taken: set[tuple[int, int, int]] = set()  # (x, y, color) routes in use
    ops: dict[tuple[int, int], list] = {(x, y): [] for x in range(W) for y in range(H)}

    def addr(n: int, nbytes: int) -> int:
        return int(rng.integers(0, 1024)) * 4 if n * nbytes < 40000 else 0

    def add_flow(src: tuple[int, int], n: int) -> None:
        for _ in range(4):
            c = int(rng.integers(0, n_colors))
            dst = (int(rng.integers(0, W)), int(rng.integers(0, H)))
            if dst == src:
                continue
            pts = _path(rng, src, dst)
            if any((px, py, c) in taken for px, py in pts):
                continue
            for i, (px, py) in enumerate(pts):
                rx = isa.PORT_RAMP if i == 0 else DIRS[(pts[i - 1][0] - px, pts[i - 1][1] - py)]
                tx = [] if i == len(pts) - 1 else [DIRS[(pts[i + 1][0] - px, pts[i + 1][1] - py)]]
                deliver = i == len(pts) - 1 or (i > 0 and rng.random() < 0.3)
                if deliver:
                    tx.append(isa.PORT_RAMP)
                b.route(px, py, c, rx, tx)
                taken.add((px, py, c))
                if deliver:
                    last = i == len(pts) - 1
                    roll = rng.random()
                    if last and roll < 0.3:
                        # forward along a new flow: a pipelined chain stage
                        c2 = _forward(px, py, n)
                        if c2 is not None:
                            ops[(px, py)].append(recv_compute_send(c, c2, isa.KIND_ADD, n, src0=addr(n, 2)))
                            continue
                    if roll < 0.6:
                        ops[(px, py)].append(recv(c, n, addr(n, 2)))
                    else:
                        ops[(px, py)].append(recv_compute(c, isa.KIND_ADD, n, dst=addr(n, 2), src0=addr(n, 2)))
            ops[src].append(send(c, n, addr(n, 2)))
            return

    def _forward(x: int, y: int, n: int) -> int | None:
        """Start a flow from (x, y) carrying the forwarded stream; its color, or None."""
        for _ in range(4):
            c2 = int(rng.integers(0, n_colors))
            dst = (int(rng.integers(0, W)), int(rng.integers(0, H)))
            if dst == (x, y):
                continue
            pts = _path(rng, (x, y), dst)
            if any((px, py, c2) in taken for px, py in pts):
                continue
            for i, (px, py) in enumerate(pts):
                rx = isa.PORT_RAMP if i == 0 else DIRS[(pts[i - 1][0] - px, pts[i - 1][1] - py)]
                if i == len(pts) - 1:
                    b.route(px, py, c2, rx, [isa.PORT_RAMP])
                    ops[(px, py)].append(recv(c2, n, addr(n, 2)))
                else:
                    b.route(px, py, c2, rx, [DIRS[(pts[i + 1][0] - px, pts[i + 1][1] - py)]])
                taken.add((px, py, c2))
            return c2
        return None

    for _ in range(int(rng.integers(0, 7))):
        add_flow((int(rng.integers(0, W)), int(rng.integers(0, H))), int(rng.integers(1, 13)))
    for pe in ops:
        for _ in range(int(rng.integers(0, 3))):
            kind, dtype = KINDS[int(rng.integers(0, len(KINDS)))]
            n = int(rng.integers(1, 41))
            ops[pe].append(compute(kind, n, dst=addr(n, 4), src0=addr(n, 4), src1=addr(n, 4), dtype=dtype))
    threads = {pe: _threads(rng, lst, T, spread) for pe, lst in ops.items()}
    for (x, y), ths in threads.items():
        for t, lst in enumerate(ths):
            if lst:
                b.assign(x, y, t, lst)
    return b.build(), cfg


def random_wide_trace(seed: int) -> tuple[Trace, hardware.WaferConfig]:
    """A wider net than random_trace: meshes up to 16 x 16, multicast trees that branch to two
    or three link ports at one router (and deliver along the way), deeper queues, longer
    latencies and streams, signal/wait pairs across threads, and many flows at once, so
    activity crosses tile boundaries in every direction. Deadlocks are possible (ops in a bad
    order) and must match too."""
    rng = np.random.default_rng(seed)
    base = hardware.load_preset(str(rng.choice(["tiny", "tiny2"])))
    cfg = base.with_overrides([
        f"fabric.queue_depth_wavelets={rng.integers(1, 9)}",
        f"fabric.hop_latency_cycles={rng.integers(1, 6)}",
        f"fabric.ramp_latency_cycles={rng.integers(1, 5)}",
        f"fabric.link_wavelets_per_cycle={rng.integers(1, 4)}",
        f"sram.sram_read_ports={rng.integers(1, 3)}",
        f"sram.sram_write_ports={rng.integers(1, 3)}",
        f"compute.vector_setup_cycles={rng.integers(0, 6)}",
        f"compute.fabric_setup_cycles={rng.integers(0, 6)}",
        "engine.watchdog_cycles=60",
        f"engine.max_cycles={int(rng.integers(50, 400)) if rng.random() < 0.1 else 20000}",
        "wafer.mesh_width=16", "wafer.mesh_height=16",
    ])
    W, H = int(rng.integers(2, 17)), int(rng.integers(1, 17))
    # safe cases give every op its own thread (they complete unless max_cycles stops them);
    # the others pack ops into a few threads in random order and often deadlock
    safe = rng.random() < 0.75
    T = 8 if safe else int(rng.integers(1, 9))
    n_colors = min(cfg.colors, 12)
    b = TraceBuilder(W, H, T, generator="randomtrace-wide", seed=seed)
    taken: set[tuple[int, int, int]] = set()
    ops: dict[tuple[int, int], list] = {(x, y): [] for x in range(W) for y in range(H)}

    def addr(n: int, nbytes: int) -> int:
        return int(rng.integers(0, 1024)) * 4 if n * nbytes < 40000 else 0

    def tree(src: tuple[int, int], c: int) -> dict[tuple[int, int], tuple[int, set[int]]] | None:
        """Routes of a multicast tree on color c: PE -> (rx, tx ports); None if it collides."""
        dst = (int(rng.integers(0, W)), int(rng.integers(0, H)))
        if dst == src:
            return None
        trunk = _path(rng, src, dst)
        routes: dict[tuple[int, int], tuple[int, set[int]]] = {}
        for i, (px, py) in enumerate(trunk):
            rx = isa.PORT_RAMP if i == 0 else DIRS[(trunk[i - 1][0] - px, trunk[i - 1][1] - py)]
            tx = set() if i == len(trunk) - 1 else {DIRS[(trunk[i + 1][0] - px, trunk[i + 1][1] - py)]}
            routes[(px, py)] = (rx, tx)
        # branches: from a router on the trunk, out of a free link port, straight on for a few hops
        for _ in range(int(rng.integers(0, 3))):
            at = trunk[int(rng.integers(0, len(trunk)))]
            rx, tx = routes[at]
            free = [p for (dx, dy), p in DIRS.items() if p not in tx and p != rx
                    and 0 <= at[0] + dx < W and 0 <= at[1] + dy < H]
            if not free:
                continue
            port = free[int(rng.integers(0, len(free)))]
            dx, dy = next(d for d, p in DIRS.items() if p == port)
            x, y, prev = at[0], at[1], port
            hops = []
            for _h in range(int(rng.integers(1, 5))):
                x, y = x + dx, y + dy
                if not (0 <= x < W and 0 <= y < H) or (x, y) in routes:
                    break
                hops.append((x, y))
            if not hops:
                continue
            tx.add(port)
            for k, (hx, hy) in enumerate(hops):
                routes[(hx, hy)] = (isa.PORT_OPPOSITE[prev], {port} if k + 1 < len(hops) else set())
        if any((x, y, c) in taken for x, y in routes):
            return None
        return routes

    def add_flow(src: tuple[int, int], n: int) -> None:
        for _ in range(6):
            c = int(rng.integers(0, n_colors))
            routes = tree(src, c)
            if routes is None:
                continue
            delivers = {(x, y): not tx or ((x, y) != src and rng.random() < 0.25) for (x, y), (_, tx) in routes.items()}
            users = [pe for pe, d in delivers.items() if d] + [src]
            if safe and any(len(ops[pe]) + users.count(pe) > T - 1 for pe in users):
                continue
            for (x, y), (rx, tx) in routes.items():
                deliver = delivers[(x, y)]
                b.route(x, y, c, rx, sorted(tx | ({isa.PORT_RAMP} if deliver else set())))
                taken.add((x, y, c))
                if deliver:
                    if rng.random() < 0.5:
                        ops[(x, y)].append(recv(c, n, addr(n, 2)))
                    else:
                        ops[(x, y)].append(recv_compute(c, isa.KIND_ADD, n, dst=addr(n, 2), src0=addr(n, 2)))
            ops[src].append(send(c, n, addr(n, 2)))
            return

    for _ in range(int(rng.integers(1, 4 + W * H // 4))):
        add_flow((int(rng.integers(0, W)), int(rng.integers(0, H))), int(rng.integers(1, 65)))
    for pe in ops:
        for _ in range(int(rng.integers(0, 3))):
            kind, dtype = KINDS[int(rng.integers(0, len(KINDS)))]
            n = int(rng.integers(1, 200))
            ops[pe].append(compute(kind, n, dst=addr(n, 4), src0=addr(n, 4), src1=addr(n, 4), dtype=dtype))
    for (x, y), lst in ops.items():
        for t, th_ops in enumerate(_threads(rng, lst, T, safe, safe)):
            if th_ops:
                b.assign(x, y, t, th_ops)
    return b.build(), cfg


def privatize(trace: Trace, stride: int = 5120) -> Trace:
    """The same trace with every thread's SRAM addresses moved into its own `stride`-byte window
    (thread t: + t * stride), so threads of a PE share no SRAM: its values cannot race
    (functional tests compare engines value for value on such traces)."""
    b = TraceBuilder(trace.mesh_width, trace.mesh_height, trace.threads, **trace.meta)
    r = trace.routes
    for pe, c, rx, tx in zip(r["pe"], r["color"], r["rx"], r["tx"]):
        x, y = trace.pe_xy(int(pe))
        b.route(x, y, int(c), int(rx), isa.ports_of(int(tx)))
    for y in range(trace.mesh_height):
        for x in range(trace.mesh_width):
            for t in range(trace.threads):
                pid = int(trace.pe_program[y, x, t])
                if pid >= 0:
                    s = t * stride
                    b.assign(x, y, t, [op._replace(dst=op.dst + s, src0=op.src0 + s, src1=op.src1 + s)
                                       for op in trace.program(pid)])
    return b.build()


def random_sram(trace: Trace, seed: int, nbytes: int = 49152) -> np.ndarray:
    """Every PE's SRAM filled with fp16 values drawn from N(0, 1) (finite as fp16 and as the
    fp32 and 8-bit values the same bytes read as)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((trace.n_pes, nbytes // 2)).astype(np.float16).view(np.uint8)
