"""Where a job's independent simulations run: in this process or as tasks on a Dask cluster,
each looked up in the stage cache first (docs/scale-out.md).

A system's decode step composes from many independent stage simulations (compose.stages), and
its prefill from a few kernels; each is deterministic, so running them elsewhere changes nothing
but the wall time. `Fanout` says how: jobs = 1 in this process; jobs > 1 on a
`distributed.LocalCluster` of that many single-threaded worker processes; jobs = 0 (auto) on one
sized to the machine, or in this process with every core when at most one simulation is missing;
`scheduler` an existing cluster (`dask scheduler` / `dask worker`). Workers build the trace from
the pickled plan, validate and simulate it; the results come back here, where the cache stores
them. A worker that dies mid-task costs a retry on another (Dask reschedules lost tasks).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Iterator

from ..engine.result import EngineResult
from ..errors import WseError
from ..hardware import WaferConfig
from ..trace import Trace
from ..trace_check import validate
from ..workload.chain import chain_of
from ..workload.compose import build_stage, checked_stage, stages
from ..workload.decode import ModelPlan
from .cache import StageCache, content_key
from .progress import Progress

# glibc's allocator in the local cluster's workers (set before each worker process starts).
# Dask sets MALLOC_TRIM_THRESHOLD_=65536, which also pins the mmap threshold at 128 KiB: every
# array above that (a stage's op columns, route tables, result counters) came from fresh pages,
# faulted in and zeroed, and went back to the OS when freed. Arrays up to 32 MiB (glibc's most)
# now come from the heap, and up to 256 MiB of freed heap is kept for the next stage: measured on
# ten Kimi K2 stages in a row, 923k page faults became 65k (a larger trim threshold faults no
# less; 128 and 64 MiB: 80k and 125k).
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 256 << 20}

Task = tuple[tuple, ModelPlan, str, object, object]  # (key, plan, stage kind, ref, delta)


@dataclasses.dataclass
class Work:
    """One simulation: its content key, how to run it here, and the function and arguments a
    worker runs instead. Both return (EngineResult, JSON-able extra)."""

    key: str
    here: Callable[[], tuple[EngineResult, dict[str, Any]]]
    fn: Callable[..., tuple[EngineResult, dict[str, Any]]]
    args: tuple


class Fanout:
    """How a job's simulations run (module docstring) and the cache they share. Use as a context
    manager: the cluster, if one was started, is closed on leaving."""

    def __init__(self, jobs: int = 1, threads: int | None = None, scheduler: str | None = None,
                 cache: StageCache | None = None, progress: Progress | None = None):
        if jobs < 0:
            raise WseError("--jobs must be at least 0 (0: sized to the machine)")
        self.jobs, self.threads, self.scheduler = jobs, threads, scheduler
        self.cache, self.progress = cache, progress or Progress(False)
        self._client = None
        self._cluster = None
        self._lock = threading.Lock()
        # set while several threads use this fanout at once (sweep points): every miss then goes
        # to the cluster, as two threads must never step the engine in this process together
        self.concurrent = False
        self._aborted = False
        self._starting: threading.Thread | None = None

    def __enter__(self) -> "Fanout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def abort(self) -> None:
        """Stop for good (a failed or interrupted sweep): the cluster closes, so tasks in flight end,
        and any later run or client call raises instead of starting another."""
        self._aborted = True
        self.close()

    def start(self) -> None:
        """Start the local cluster of `jobs` > 1 workers in the background, while the job plans
        (a few seconds of process starts and imports), so its first simulation need not wait;
        a failure to start surfaces when a simulation asks for the cluster."""
        if self.jobs > 1 and not self.scheduler and self._starting is None:
            def start_quietly() -> None:
                try:
                    self.client()
                except Exception:  # (client() raises it again, on the job's thread)
                    pass
            self._starting = threading.Thread(target=start_quietly, name="wse-cluster-start", daemon=True)
            self._starting.start()

    def close(self) -> None:
        if self._starting is not None:  # (a cluster being started is closed once it is up)
            self._starting.join()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        if self.cache is not None:
            self.cache.save_stats()

    @property
    def workers(self) -> int:
        """Worker processes a cluster started here has (or would have)."""
        return self.jobs or (os.cpu_count() or 1)

    def remote(self, missing: int) -> bool:
        """Whether `missing` simulations run on a cluster rather than here."""
        if self.scheduler or (self.concurrent and self.jobs != 1):
            return True
        return self.jobs > 1 or (self.jobs == 0 and self.workers > 1 and missing > 1)

    def worker_threads(self) -> int:
        """Numba threads each worker simulates with (default: the cores shared among workers)."""
        if self.threads:
            return self.threads
        return 1 if self.scheduler else max(1, (os.cpu_count() or 1) // self.workers)

    def client(self):
        with self._lock:
            if self._aborted:
                raise WseError("stopped: the sweep ended before this point finished")
            if self._client is None:
                from distributed import Client, LocalCluster
                if self.scheduler:
                    try:
                        self._client = Client(self.scheduler, timeout="30s")
                    except (OSError, TimeoutError, ValueError) as e:
                        raise WseError(f"--scheduler {self.scheduler}: cannot connect ({e})") from None
                else:
                    import dask
                    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v
                                          for k, v in WORKER_MALLOC.items()}):
                        self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                                     dashboard_address=":0", silence_logs=logging.CRITICAL)
                    self._client = Client(self._cluster)
            return self._client

    def run(self, works: list[Work], more: Callable[[int, EngineResult, dict[str, Any]], list[Work]] | None = None
            ) -> Iterator[tuple[int, EngineResult, dict[str, Any]]]:
        """(index, result, extra) of every work, cache hits first, the rest as they finish.

        more(index, result, extra), called as each result comes in: works that may start now
        (their indices follow those before), looked up, run and yielded like the rest, so work
        that depends on a result need not wait for all of them."""
        if self._aborted:
            raise WseError("stopped: the sweep ended before this point finished")
        works = list(works)
        unseen = collections.deque(range(len(works)))  # not looked up yet
        todo: list[int] = []  # looked up and missing

        def finished(i: int, r: EngineResult, extra: dict[str, Any]):
            if more is not None:
                for w in more(i, r, extra):
                    works.append(w)
                    unseen.append(len(works) - 1)
            yield i, r, extra

        def lookups():
            while unseen:
                i = unseen.popleft()
                got = self._lookup(works[i].key)
                if got is None:
                    todo.append(i)
                    self.progress.add(1)
                    continue
                self.progress.add(1, cached=1)
                yield from finished(i, got[0], got[1])

        yield from lookups()
        if not todo:
            return
        if not self.remote(len(todo)):
            while todo:
                i = todo.pop(0)
                r, extra = works[i].here()
                self._store(works[i].key, r, extra)
                self.progress.done()
                yield from finished(i, r, extra)
                yield from lookups()
            return
        from distributed import as_completed
        client = self.client()
        code = code_identity()
        futures = {}
        pending = as_completed()

        def submit() -> None:
            for i in todo:
                f = client.submit(_on_worker, code, works[i].fn, *works[i].args, key=f"wse-stage-{works[i].key}",
                                  pure=False)
                futures[f] = i
                pending.add(f)
            todo.clear()

        submit()
        try:
            for f in pending:
                r, extra = _result(f, self.scheduler)
                f.release()  # the worker may drop its copy now, not when the last one is in
                i = futures.pop(f)
                self._store(works[i].key, r, extra)
                self.progress.done()
                yield from finished(i, r, extra)
                yield from lookups()
                submit()
        finally:
            for f in futures:
                f.release()

    def simulate_cached(self, trace: Trace, cfg: WaferConfig, simulate: Callable[[Trace], object]) -> EngineResult:
        """A trace already built, simulated here unless the cache holds its result (keyed by its
        content hash and the configuration)."""
        work = Work(content_key("trace", trace.content_hash(), cfg), lambda: (simulate(trace), {}), _simulate_trace,
                    (trace, cfg, self.worker_threads()))
        return list(self.run([work]))[0][1]

    def _lookup(self, key: str):
        if self.cache is None:
            return None
        with self._lock:
            return self.cache.get(key)

    def _store(self, key: str, r: EngineResult, extra: dict[str, Any]) -> None:
        if self.cache is not None and r.complete:
            with self._lock:
                self.cache.put(key, r, extra)


def _result(future, scheduler: str | None):
    """A task's value; the cluster's own failures (workers lost past the retries, the scheduler
    gone, the task cancelled) as one WseError naming the cluster. Errors the task raised (a
    WseError about its stage) come back as they were raised."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker
    try:
        return future.result()
    except (KilledWorker, CommClosedError, CancelledError, TimeoutError, OSError) as e:
        where = f"Dask scheduler {scheduler}" if scheduler else "the local Dask cluster"
        try:
            said = f": {e}"
        except Exception:  # an exception that cannot even say what it is
            said = ""
        raise WseError(f"{where} failed a stage simulation ({type(e).__name__}{said})") from None


def code_identity() -> tuple[int, str]:
    """The engine's semantic version and the source digest the cache keys carry."""
    from ..engine import SEMANTIC_VERSION
    from .cache import source_digest
    return SEMANTIC_VERSION, source_digest()


def _on_worker(code: tuple[int, str], fn: Callable, *args: Any):
    """Worker side: run fn(*args) only if this worker builds and simulates with the same code as
    the client (else its results would be cached under keys that do not describe them)."""
    if code_identity() != code:
        import socket
        raise WseError(f"Dask worker on {socket.gethostname()} runs another wse-sim (engine version or source "
                       "differs from this client's): install the same version on every worker")
    return fn(*args)


def distinct_tasks(plans: list[ModelPlan], known: set | dict = ()) -> tuple[list[Task], list[int]]:
    """The stage simulations the plans need that are not in `known`, each once, and how many of
    them each plan is the first to need. A plan that begins with a leading part needs its delta
    (compose.stages) for that part's stage, which is left out (system.wafers.run_decode lists it
    once the delta is known)."""
    seen = set(known)
    tasks: list[Task] = []
    first = []
    for plan in plans:
        before = len(tasks)
        listed = stages(plan)
        if chain_of(plan).leading is not None:
            listed = listed[1:]
        for key, kind, ref in listed:
            if key not in seen:
                seen.add(key)
                tasks.append((key, plan, kind, ref, None))
        first.append(len(tasks) - before)
    return tasks, first


def stage_key(plan: ModelPlan, key: tuple) -> str:
    """The content key of a decode stage: its build key (compose.stages), which tells apart the
    stages of one run, and what every stage of the run shares (model, wafer configuration,
    decode parameters, slot shape and expert-region mapping)."""
    return content_key("decode-stage", plan.spec, plan.cfg, plan.params, plan.P, plan.Q, plan.experts_per_region,
                       plan.expert_regions, key)


def _simulate_trace(trace: Trace, cfg: WaferConfig, threads: int) -> tuple[EngineResult, dict[str, Any]]:
    """Worker side: a validated trace on the engine with `threads` Numba threads."""
    from ..engine.run import simulate, stage_options
    return simulate(trace, cfg, threads=threads, validated=True, **stage_options(threads)), {}


def _run_task(task: Task, cfg: WaferConfig, simulate: Callable[[Trace], object], where: str
              ) -> tuple[EngineResult, dict[str, Any]]:
    """Build, validate and simulate one stage: (result, {"anchor": anchor})."""
    key, plan, kind, ref, delta = task
    st = build_stage(plan, kind, ref, delta)
    validate(st.trace, cfg, where=where, fit=False)
    return checked_stage(key, simulate(st.trace)), {"anchor": list(st.anchor) if st.anchor else None}


def _simulate_task(task: Task, cfg: WaferConfig, threads: int, where: str) -> tuple[EngineResult, dict[str, Any]]:
    """Worker side: one stage on the engine with `threads` Numba threads, its counters sent back
    narrowed (EngineResult.narrowed: a group stage's 75 MB become 19 MB to send, receive and hold)."""
    from ..engine.run import simulate, stage_options
    r, extra = _run_task(task, cfg, lambda t: simulate(t, cfg, threads=threads, validated=True,
                                                       **stage_options(threads)), where)
    return r.narrowed(), extra


def run_tasks(tasks: list[Task], cfg: WaferConfig, simulate: Callable[[Trace], object], where: str,
              fanout: Fanout | None = None,
              more: Callable[[tuple, EngineResult, tuple[int, int] | None], list[Task]] | None = None
              ) -> Iterator[tuple[tuple, EngineResult, tuple[int, int] | None]]:
    """(key, result, anchor) of every task: from the cache, simulated here through `simulate`,
    or on the fanout's workers; in the order they become available. more(key, result, anchor),
    called as each comes in: tasks that may start now (Fanout.run)."""
    fanout = fanout or Fanout()
    threads = fanout.worker_threads()
    tasks = list(tasks)

    def work(t: Task) -> Work:
        return Work(stage_key(t[1], t[0]), (lambda: _run_task(t, cfg, simulate, where)), _simulate_task,
                    (t, cfg, threads, where))

    def follow(i: int, result: EngineResult, extra: dict[str, Any]) -> list[Work]:
        anchor = extra.get("anchor")
        new = more(tasks[i][0], checked_stage(tasks[i][0], result), tuple(anchor) if anchor else None)
        tasks.extend(new)
        return [work(t) for t in new]

    for i, result, extra in fanout.run([work(t) for t in tasks], follow if more is not None else None):
        anchor = extra.get("anchor")
        yield tasks[i][0], checked_stage(tasks[i][0], result), tuple(anchor) if anchor else None


def prefill_kernels(spec, cfg: WaferConfig, P: int, prompt: int, lm_width: int, simulate: Callable[[Trace], object],
                    where: str, fanout: Fanout | None = None, algo: str = "meshgemm", prefix: int = 0,
                    Q: int | None = None, lm_rows: int | None = None, keys: int | None = None,
                    precisions: tuple[str, str] = ("bf16", "bf16")):
    """A `kernels` function for workload.prefill.prefill on P x Q layer regions: each named
    kernel's pieces (prefill.pieces: the whole kernel, a GEMM's first prefix / 2 and prefix
    steps, or a weight-stationary GEMM's token blocks) from the cache, built and simulated here
    through `simulate`, or on the fanout's workers (traces not sent back), and combined. The LM
    head's GEMV runs on lm_width columns by lm_rows rows (default P). keys: the tokens a chunk's
    queries attend (the key kernels' pieces carry it, so the others share one cache entry).
    precisions: the (dense, routed experts') weights the decode step stores (prefill.kernel_weights:
    a weight GEMM's pieces below 16 bits carry theirs)."""
    fanout = fanout or Fanout()
    Q = Q or P
    from ..workload.prefill import KEYED_KERNELS, Combined, kernel_weights, pieces
    shape = (P,) if Q == P else (P, Q)  # square slots keep their cache keys
    keys = keys if keys != prompt else None

    def work(n: str, kw: dict[str, int]) -> Work:
        return Work(content_key("prefill-kernel", spec, cfg, *shape, prompt, n, algo,
                                lm_width if n == "lm_head" else None,  # only the head's region has that width
                                *([("rows", lm_rows)] if lm_rows and n == "lm_head" else []),  # (a strip)
                                *([kw["steps"]] if "steps" in kw else []),
                                *([("batch", kw["batch"])] if "batch" in kw else []),
                                *([("keys", kw["keys"])] if "keys" in kw else []),
                                *([("weights", kw["weights"])] if "weights" in kw else [])),
                    (lambda: _prefill_here(spec, cfg, P, prompt, n, algo, lm_width, simulate, where, Q, kw, lm_rows)),
                    _prefill_task, (spec, cfg, P, prompt, n, algo, lm_width, fanout.worker_threads(), where, Q, kw,
                                    lm_rows))

    def kernel_pieces(n: str) -> list[tuple[float, dict]]:
        """n's pieces, each carrying its keys (a key kernel's) and its weights (below 16 bits)."""
        if n == "lm_head":
            return [(1.0, {})]
        w = kernel_weights(spec, n, precisions)
        extra = {**({"keys": keys} if keys and n in KEYED_KERNELS else {}), **({"weights": w} if w != "bf16" else {})}
        return [(f, dict(kw, **extra)) for f, kw in pieces(spec, cfg, P, prompt, n, algo, Q, prefix, keys, w)]

    def kernels(names):
        parts = {n: kernel_pieces(n) for n in names}
        todo = [(n, i) for n in names for i in range(len(parts[n]))]
        got: dict[tuple[str, int], tuple] = {}
        for j, result, extra in fanout.run([work(n, parts[n][i][1]) for n, i in todo]):
            got[todo[j]] = (result, extra["facts"])
        for n in names:
            results = [got[(n, i)][0] for i in range(len(parts[n]))]
            yield n, Combined.assemble(parts[n], results), got[(n, 0)][1], None
    return kernels


def _prefill_here(spec, cfg: WaferConfig, P: int, prompt: int, name: str, algo: str, lm_width: int,
                  simulate: Callable[[Trace], object], where: str, Q: int | None = None,
                  kw: dict[str, int] | None = None, lm_rows: int | None = None) -> tuple[EngineResult, dict[str, Any]]:
    from ..workload.prefill import kernel_trace
    tr, facts = kernel_trace(spec, cfg, P, prompt, name, algo, lm_width, Q=Q, lm_rows=lm_rows, **(kw or {}))
    validate(tr, cfg, where=where)
    return simulate(tr), {"facts": {k: int(v) for k, v in facts.items()}}


def _prefill_task(spec, cfg: WaferConfig, P: int, prompt: int, name: str, algo: str, lm_width: int, threads: int,
                  where: str, Q: int | None = None, kw: dict[str, int] | None = None, lm_rows: int | None = None
                  ) -> tuple[EngineResult, dict[str, Any]]:
    """Worker side: one prefill kernel piece built, validated and simulated with `threads` Numba threads."""
    from ..engine.run import STAGE_TIMELINE, simulate
    return _prefill_here(spec, cfg, P, prompt, name, algo, lm_width,
                         lambda t: simulate(t, cfg, threads=threads, validated=True, timeline=STAGE_TIMELINE), where, Q, kw,
                         lm_rows)
