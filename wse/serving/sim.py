"""Discrete-event serving of a request stream: the wafer pipeline (micro-batches and prefills
flowing through a tandem of pipeline stages) and GPU nodes (iteration-level batching, vLLM-like).
docs/serving.md gives the rules; both sides admit by the same policy (first come, first served;
a request reserves KV room for its prompt plus output tokens when admitted, so nothing is ever
preempted; one whose reservation exceeds the whole capacity is rejected on arrival).

The per-step times come from a step model (steps.py): the wafer's from cycle simulations at
sampled (batch, context) points, the GPU's from the analytic node model.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from typing import Protocol

import numpy as np

from .requests import Requests


@dataclasses.dataclass
class Outcome:
    """What happened to each request (arrays in request order; times in seconds from the start,
    nan where a request was rejected) and the run's totals."""

    admitted_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    tokens: np.ndarray  # output tokens generated
    rejected: np.ndarray  # bool
    end_s: float  # the last request finished (or the last arrival, if later)
    steps: int  # decode steps (wafer: micro-batch passes; GPU: iterations)
    prefills: int  # prefill passes
    busy_s: float  # wafer: time the busiest stage held an item; GPU: time an iteration ran
    activity: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(4))  # metrics.ACTIVITY totals
    kv_ready_s: np.ndarray | None = None  # disaggregated prefill: the request's KV on the decode wafers
    handoff_bytes: int = 0  # disaggregated prefill: KV bytes sent to the decode wafers (in activity's link bytes)

    @property
    def completed(self) -> np.ndarray:
        return ~self.rejected


class PipelineSteps(Protocol):
    """Per-stage hold times (seconds, chain order) of the wafer pipeline's items."""

    groups: int  # micro-batches that circulate
    seats: int  # sequences per micro-batch
    kv_tokens: int  # KV-cache tokens the wafers hold for all sequences together
    max_tokens: int  # the most one sequence may hold (prompt + output)

    def decode(self, n: int, context: float) -> tuple[np.ndarray, float]: ...
    def prefill(self, prompt: int) -> tuple[np.ndarray, float]: ...
    def prefill_chunk(self, start: int, end: int, last: bool) -> tuple[np.ndarray, float]: ...
    def activity(self, n: int, context: float) -> np.ndarray: ...  # of a decode pass (metrics.ACTIVITY)
    def prefill_activity(self, prompt: int) -> np.ndarray: ...


class PrefillPool(Protocol):
    """Separate prefill wafers (handoff.py): their pipeline's stage holds for a prompt chunk, and
    the KV hand-off to the decode wafers once the prompt has left each layer's region."""

    stages: int

    def reset(self) -> None: ...  # a new run: every link free
    def prefill_chunk(self, start: int, end: int, last: bool) -> tuple[np.ndarray, float]: ...
    def handoff(self, prompt: int, departures_s: np.ndarray, first_token_s: float
                ) -> tuple[float, int]: ...  # (KV and token on the decode wafers, bytes)


class Tandem:
    """Items passing a chain of stages in order, each stage holding one item at a time: an item
    leaves stage j at D[j] = max(D[j-1], D'[j]) + h[j] (D' the item before), which in closed form
    is C[j] + max(entry, max_{i<=j} (D'[i] - C[i-1])) with C the cumulative holds; it emerges
    `delay` seconds after leaving the last stage (transfer latencies, which hold no stage)."""

    def __init__(self, stages: int):
        self.last = np.full(stages, -np.inf)
        self.entries = 0
        self.busy = np.zeros(stages)  # seconds each stage held an item

    def enter(self, ready_s: float, holds: np.ndarray, delay: float) -> float:
        c = np.cumsum(holds)
        d = c + np.maximum.accumulate(np.maximum(self.last - (c - holds), ready_s))
        self.busy += holds
        self.last = d
        self.entries += 1
        return float(d[-1]) + delay


ARRIVE, EXIT, CHUNK, JOIN = 0, 1, 2, 3


def serve_pipeline(req: Requests, steps: PipelineSteps, chunk: int = 0, pool: PrefillPool | None = None) -> Outcome:
    """The wafer system: `steps.groups` micro-batches of up to `steps.seats` sequences circulate
    through the pipeline; each pass gives every member a token. An admitted request's prompt
    passes as a prefill item (its first token at the exit) and then joins its micro-batch at the
    micro-batch's next pass (iteration-level batching). Items enter the first stage in the order
    they are ready. chunk > 0: the prompt passes in chunks of that many tokens, each ready when
    the one before has left the first stage (decode passes ready earlier go between them).
    pool: prefills run on separate prefill wafers (their own pipeline) and a request joins its
    micro-batch when its KV cache has reached the decode wafers."""
    n = len(req)
    adm, first, fin = (np.full(n, np.nan) for _ in range(3))
    kv_ready = np.full(n, np.nan)
    tokens = np.zeros(n, dtype=np.int64)
    rejected = (req.prompt + req.output) > min(steps.kv_tokens, steps.max_tokens)
    line = Tandem(len(steps.decode(1, 1.0)[0]))
    if pool is not None:
        pool.reset()
    pline = Tandem(pool.stages) if pool is not None else line  # where prefills run
    members: list[list[int]] = [[] for _ in range(steps.groups)]  # requests decoding in each group
    joining: list[list[int]] = [[] for _ in range(steps.groups)]  # prefilled, waiting for the group's next pass
    seats_used = np.zeros(steps.groups, dtype=np.int64)  # members + joining + being prefilled
    running = [False] * steps.groups  # group in the pipeline
    ctx = np.zeros(n, dtype=np.int64)  # tokens in each request's KV cache
    reserved = 0
    waiting: deque[int] = deque()
    events: list[tuple[float, int, int, int]] = []  # (time, order, kind, payload)
    seq = 0
    for i in range(n):
        if not rejected[i]:
            events.append((float(req.arrival_s[i]), i, ARRIVE, i))
    heapq.heapify(events)
    seq = n
    decode_passes = prefills = handoff_bytes = 0
    activity = np.zeros(4)

    def push(t: float, kind: int, payload: int) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    def start_group(g: int, now: float) -> None:
        nonlocal decode_passes, activity
        members[g].extend(joining[g])
        joining[g].clear()
        if not members[g]:
            running[g] = False
            return
        m = members[g]
        c = float(ctx[m].mean())
        holds, delay = steps.decode(len(m), c)
        activity = activity + steps.activity(len(m), c)
        running[g] = True
        decode_passes += 1
        push(line.enter(now, holds, delay), EXIT, g)

    group_of = np.zeros(n, dtype=np.int64)

    def enter_chunk(i: int, start: int, now: float) -> None:
        nonlocal activity, handoff_bytes
        S = int(req.prompt[i])
        end = min(S, start + chunk) if chunk else S
        holds, delay = (pool or steps).prefill_chunk(start, end, end == S)
        exit_s = pline.enter(now, holds, delay)
        if end < S:
            pending_chunk[i] = end
            push(float(pline.last[0]), CHUNK, i)
            return
        push(exit_s, EXIT, -(i + 1) * steps.groups - int(group_of[i]) - 1)
        if pool is not None and req.output[i] > 1:  # the KV cache moves to the decode wafers
            ready, nbytes = pool.handoff(S, pline.last, exit_s)
            kv_ready[i] = ready
            activity = activity + np.array([0.0, 0.0, 0.0, float(nbytes)])
            handoff_bytes += nbytes
            push(float(kv_ready[i]), JOIN, i)

    pending_chunk: dict[int, int] = {}

    def admit(now: float) -> None:
        nonlocal reserved, prefills, activity
        while waiting:
            i = waiting[0]
            need = int(req.prompt[i] + req.output[i])
            g = int(np.argmin(seats_used))  # the emptiest group, the lowest index among equals
            if seats_used[g] >= steps.seats or reserved + need > steps.kv_tokens:
                return
            waiting.popleft()
            reserved += need
            seats_used[g] += 1
            adm[i] = now
            activity = activity + steps.prefill_activity(int(req.prompt[i]))
            prefills += 1
            group_of[i] = g
            enter_chunk(i, 0, now)

    def leave(i: int, g: int, now: float) -> None:
        nonlocal reserved
        fin[i] = now
        reserved -= int(req.prompt[i] + req.output[i])
        seats_used[g] -= 1

    while events:
        now, _, kind, x = heapq.heappop(events)
        if kind == ARRIVE:
            waiting.append(x)
        elif kind == CHUNK:  # the request's next chunk follows the one that left the first stage
            enter_chunk(x, pending_chunk.pop(x), now)
        elif kind == JOIN:  # its KV cache is on the decode wafers: it joins its micro-batch
            g = int(group_of[x])
            joining[g].append(x)
            if not running[g]:
                start_group(g, now)
        elif x >= 0:  # a micro-batch's pass ends: a token for every member
            g = x
            keep = []
            for i in members[g]:
                tokens[i] += 1
                ctx[i] += 1
                if tokens[i] >= req.output[i]:
                    leave(i, g, now)
                else:
                    keep.append(i)
            members[g] = keep
            start_group(g, now)
        else:  # a prefill ends: the first token
            code = -x - 1
            i, g = code // steps.groups - 1, code % steps.groups
            first[i] = now
            tokens[i] = 1
            ctx[i] = req.prompt[i] + 1
            if req.output[i] <= 1:
                leave(i, g, now)
            elif pool is None:
                joining[g].append(i)
                if not running[g]:
                    start_group(g, now)
        admit(now)
    end = float(np.nanmax(fin, initial=float(req.arrival_s[-1])))
    busy = max(float(line.busy.max()), float(pline.busy.max()))
    return Outcome(adm, first, fin, tokens, rejected, max(end, float(req.arrival_s[-1])), decode_passes, prefills,
                   busy, activity, kv_ready if pool is not None else None, handoff_bytes)


class IterationSteps(Protocol):
    """Iteration times (seconds) of GPU nodes."""

    max_seqs: int  # sequences batched together at most
    max_prefill_tokens: int  # prompt tokens one prefill iteration takes at most
    kv_tokens: int  # KV-cache tokens the nodes' HBM holds beside the weights

    def decode(self, n: int, context: float) -> float: ...
    def prefill(self, prompts: list[int]) -> float: ...
    def mixed(self, n: int, context: float, pieces: list[tuple[int, int, bool]]) -> float: ...


def serve_iterations(req: Requests, steps: IterationSteps, chunk: int = 0) -> Outcome:
    """GPU nodes with iteration-level batching: each iteration either prefills the requests
    admitted since the last (up to max_prefill_tokens prompt tokens; prefill first, as vLLM's
    default scheduler) or decodes one token for every running sequence. chunk > 0: chunked
    prefill (_serve_chunked)."""
    if chunk:
        return _serve_chunked(req, steps, chunk)
    n = len(req)
    adm, first, fin = (np.full(n, np.nan) for _ in range(3))
    tokens = np.zeros(n, dtype=np.int64)
    rejected = (req.prompt + req.output) > steps.kv_tokens
    arrivals = [i for i in range(n) if not rejected[i]]
    ctx = np.zeros(n, dtype=np.int64)
    running: list[int] = []
    waiting: deque[int] = deque()
    now, nxt, reserved, iters, prefills, busy = 0.0, 0, 0, 0, 0, 0.0
    while nxt < len(arrivals) or waiting or running:
        while nxt < len(arrivals) and req.arrival_s[arrivals[nxt]] <= now:
            waiting.append(arrivals[nxt])
            nxt += 1
        batch, ptoks = [], 0
        while waiting and len(running) + len(batch) < steps.max_seqs:
            i = waiting[0]
            need = int(req.prompt[i] + req.output[i])
            if reserved + need > steps.kv_tokens or (batch and ptoks + req.prompt[i] > steps.max_prefill_tokens):
                break
            waiting.popleft()
            reserved += need
            batch.append(i)
            ptoks += int(req.prompt[i])
        if batch:
            dt = steps.prefill([int(req.prompt[i]) for i in batch])
            now += dt
            busy += dt
            prefills += 1
            for i in batch:
                adm[i] = now - dt
                reserved -= _first_token(i, req, tokens, ctx, first, fin, now, running)
        elif running:
            dt = steps.decode(len(running), float(ctx[running].mean()))
            now += dt
            busy += dt
            iters += 1
            running, freed = _decode_step(running, req, tokens, ctx, fin, now)
            reserved -= freed
        else:  # idle until the next arrival
            now = max(now, float(req.arrival_s[arrivals[nxt]]))
    end = max(now, float(req.arrival_s[-1]))
    return Outcome(adm, first, fin, tokens, rejected, end, iters, prefills, busy)


def _first_token(i: int, req: Requests, tokens: np.ndarray, ctx: np.ndarray, first: np.ndarray, fin: np.ndarray,
                 now: float, running: list[int]) -> int:
    """Request i's prefill ends at `now` with its first token: it finishes (returns the KV tokens
    it frees) or joins `running` (returns 0)."""
    first[i] = now
    tokens[i] = 1
    ctx[i] = req.prompt[i] + 1
    if req.output[i] <= 1:
        fin[i] = now
        return int(req.prompt[i] + req.output[i])
    running.append(i)
    return 0


def _decode_step(running: list[int], req: Requests, tokens: np.ndarray, ctx: np.ndarray, fin: np.ndarray,
                 now: float) -> tuple[list[int], int]:
    """One token for every running sequence at `now`: (those still running, KV tokens freed by
    the ones that finished)."""
    keep, freed = [], 0
    for i in running:
        tokens[i] += 1
        ctx[i] += 1
        if tokens[i] >= req.output[i]:
            fin[i] = now
            freed += int(req.prompt[i] + req.output[i])
        else:
            keep.append(i)
    return keep, freed


def _serve_chunked(req: Requests, steps: IterationSteps, budget: int) -> Outcome:
    """Chunked prefill, as vLLM's: every iteration decodes one token of each running sequence
    and fills the rest of a `budget`-token batch with prompt pieces of the admitted requests in
    order, one fused iteration (steps.mixed); a request's first token comes with its last piece."""
    n = len(req)
    adm, first, fin = (np.full(n, np.nan) for _ in range(3))
    tokens = np.zeros(n, dtype=np.int64)
    rejected = (req.prompt + req.output) > steps.kv_tokens
    arrivals = [i for i in range(n) if not rejected[i]]
    ctx = np.zeros(n, dtype=np.int64)
    running: list[int] = []
    filling: list[list[int]] = []  # [request, prompt tokens prefilled so far]
    waiting: deque[int] = deque()
    now, nxt, reserved, iters, prefills, busy = 0.0, 0, 0, 0, 0, 0.0
    while nxt < len(arrivals) or waiting or running or filling:
        while nxt < len(arrivals) and req.arrival_s[arrivals[nxt]] <= now:
            waiting.append(arrivals[nxt])
            nxt += 1
        while waiting and len(running) + len(filling) < steps.max_seqs:
            i = waiting[0]
            need = int(req.prompt[i] + req.output[i])
            if reserved + need > steps.kv_tokens:
                break
            waiting.popleft()
            reserved += need
            adm[i] = now
            filling.append([i, 0])
            prefills += 1
        room = max(budget - len(running), 0)
        pieces = []
        for f in filling:
            if room <= 0:
                break
            i, done = f
            take = min(room, int(req.prompt[i]) - done)
            pieces.append((done, done + take, done + take == req.prompt[i]))
            room -= take
        if not running and not pieces:
            now = max(now, float(req.arrival_s[arrivals[nxt]]))
            continue
        c = float(ctx[running].mean()) if running else 0.0
        dt = steps.mixed(len(running), c, pieces) if pieces else steps.decode(len(running), c)
        now += dt
        busy += dt
        iters += 1
        keep, freed = _decode_step(running, req, tokens, ctx, fin, now)
        reserved -= freed
        for f, (a, b, last) in zip(list(filling), pieces):
            f[1] = b
            if last:
                filling.remove(f)
                reserved -= _first_token(f[0], req, tokens, ctx, first, fin, now, keep)
        running = keep
    end = max(now, float(req.arrival_s[-1]))
    return Outcome(adm, first, fin, tokens, rejected, end, iters, prefills, busy)


def serve_replicas(req: Requests, steps: IterationSteps, chunk: int = 0) -> Outcome:
    """`steps.replicas` (default 1) copies of the model, each serving every replicas-th request
    in arrival order (round robin) by serve_iterations; the outcomes merged."""
    k = getattr(steps, "replicas", 1)
    if k == 1:
        return serve_iterations(req, steps, chunk)
    n = len(req)
    out = Outcome(*(np.full(n, np.nan) for _ in range(3)), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool),
                  float(req.arrival_s[-1]), 0, 0, 0.0)
    for r in range(k):
        idx = np.arange(r, n, k)
        if not len(idx):
            continue
        o = serve_iterations(Requests(req.arrival_s[idx], req.prompt[idx], req.output[idx]), steps, chunk)
        for name in ("admitted_s", "first_token_s", "finish_s", "tokens", "rejected"):
            getattr(out, name)[idx] = getattr(o, name)
        out.end_s = max(out.end_s, o.end_s)
        out.steps += o.steps
        out.prefills += o.prefills
        out.busy_s += o.busy_s / k
    return out
