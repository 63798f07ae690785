"""Distinct stage simulations of a system's wafers (and its prefill kernels), one after another
or in worker processes.

A system's decode step composes from many independent stage simulations (compose.stages); each
is deterministic, so simulating them in parallel processes changes nothing but the wall time.
Workers are spawned (not forked: the parent may already run Numba threads), build their stage
trace from the pickled plan, validate it and simulate it with their own Numba threads. As with
any spawned pool, a script that calls this with jobs > 1 must guard its top level with
`if __name__ == "__main__":` (the workers import the main module).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from typing import Callable, Iterator

from ..hardware import WaferConfig
from ..trace import Trace, validate
from ..workload.chain import chain_of
from ..workload.compose import build_stage, checked_stage, stages
from ..workload.decode import ModelPlan

Task = tuple[tuple, ModelPlan, str, object, object]  # (key, plan, stage kind, ref, delta)
Done = Callable[[int, int], None]  # (stages simulated, stages in all)


def distinct_tasks(plans: list[ModelPlan], known: set | dict = (), deltas: dict[int, int] | None = None
                   ) -> tuple[list[Task], list[int]]:
    """The stage simulations the plans need that are not in `known`, each once, and how many of
    them each plan is the first to need. A plan that begins with a leading part needs its delta
    (compose.stages): with `deltas` (plan index -> delta) given, only those plans' leading
    stages are listed; without, every stage but the leading ones."""
    seen = set(known)
    tasks: list[Task] = []
    first = []
    for w, plan in enumerate(plans):
        before = len(tasks)
        lead = chain_of(plan).leading is not None
        if deltas is not None and w not in deltas:
            first.append(0)
            continue
        delta = deltas[w] if deltas is not None else None
        listed = stages(plan, delta)
        if deltas is not None:
            listed = listed[:1]  # the leading part's stage
        elif lead:
            listed = listed[1:]
        for key, kind, ref in listed:
            if key not in seen:
                seen.add(key)
                tasks.append((key, plan, kind, ref, delta))
        first.append(len(tasks) - before)
    return tasks, first


def _run_task(task: Task, cfg: WaferConfig, simulate: Callable[[Trace], object], where: str
              ) -> tuple[tuple, object, object]:
    """Build, validate and simulate one stage: (key, result, anchor)."""
    key, plan, kind, ref, delta = task
    st = build_stage(plan, kind, ref, delta)
    validate(st.trace, cfg, where=where, fit=False)
    return key, checked_stage(key, simulate(st.trace)), st.anchor


def _simulate_task(task: Task, cfg: WaferConfig, threads: int | None, where: str) -> tuple[tuple, object, object]:
    """Worker side: one stage on the engine with `threads` Numba threads."""
    from ..engine.run import simulate
    return _run_task(task, cfg, lambda t: simulate(t, cfg, threads=threads, validated=True), where)


def run_tasks(tasks: list[Task], cfg: WaferConfig, simulate: Callable[[Trace], object], where: str,
              jobs: int = 1, threads: int | None = None, done: Done | None = None
              ) -> Iterator[tuple[tuple, object, object]]:
    """(key, result, anchor) of every task. jobs = 1: in this process through `simulate`;
    jobs > 1: in that many spawned worker processes with `threads` Numba threads each (default
    1), results yielded as they finish."""
    n = len(tasks)
    if jobs <= 1 or n <= 1:
        for i, task in enumerate(tasks):
            yield _run_task(task, cfg, simulate, where)
            if done:
                done(i + 1, n)
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(jobs, n), mp_context=ctx) as pool:
        futures = [pool.submit(_simulate_task, t, cfg, threads or 1, where) for t in tasks]
        try:
            for i, f in enumerate(cf.as_completed(futures)):
                yield f.result()
                if done:
                    done(i + 1, n)
        finally:
            for f in futures:
                f.cancel()


def prefill_kernels(spec, cfg: WaferConfig, P: int, prompt: int, lm_width: int, simulate: Callable[[Trace], object],
                    where: str, jobs: int = 1, threads: int | None = None, algo: str = "meshgemm"):
    """A `kernels` function for workload.prefill.prefill: each named kernel built, validated and
    simulated here through `simulate` (jobs = 1) or in that many spawned worker processes (its
    trace is not sent back)."""
    from ..workload.prefill import kernel_trace

    def here(names):
        for name in names:
            tr, facts = kernel_trace(spec, cfg, P, prompt, name, algo, lm_width)
            validate(tr, cfg, where=where)
            yield name, simulate(tr), facts, tr

    def workers(names):
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(jobs, len(names)), mp_context=ctx) as pool:
            futures = [pool.submit(_prefill_task, spec, cfg, P, prompt, n, algo, lm_width, threads or 1, where)
                       for n in names]
            try:
                for f in futures:
                    yield f.result()
            finally:
                for f in futures:
                    f.cancel()
    return here if jobs <= 1 else workers


def _prefill_task(spec, cfg: WaferConfig, P: int, prompt: int, name: str, algo: str, lm_width: int, threads: int,
                  where: str):
    """Worker side: one prefill kernel built, validated and simulated with `threads` Numba threads."""
    from ..engine.run import simulate
    from ..workload.prefill import kernel_trace
    tr, facts = kernel_trace(spec, cfg, P, prompt, name, algo, lm_width)
    validate(tr, cfg, where=where)
    return name, simulate(tr, cfg, threads=threads, validated=True), facts, None
