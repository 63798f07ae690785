"""The requests a serving run replays: arrival times and prompt and output lengths, drawn from
seeded distributions or read from a CSV file (docs/serving.md).

Every request is one row of three arrays (structure of arrays): `arrival_s`, `prompt` and
`output` tokens. The same requests, in the same order, are served by the wafer system and by
the GPU nodes.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np

from ..errors import WseError
from ..workload.params import MAX_CONTEXT

DIST_FORMS = ("N", "const:N", "uniform:LO:HI", "normal:MEAN:SD", "lognormal:MEAN:SD", "exp:MEAN")
MAX_REQUESTS = 2_000_000  # more would not fit the run file's per-request tables comfortably


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A token-count distribution (`kind` in const, uniform, normal, lognormal, exp); draws are
    rounded to whole tokens and clipped to [1, MAX_CONTEXT]."""

    kind: str
    a: float
    b: float = 0.0

    @property
    def mean(self) -> float:
        return {"const": self.a, "uniform": (self.a + self.b) / 2}.get(self.kind, self.a)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "const":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.integers(int(self.a), int(self.b) + 1, n).astype(float)
        elif self.kind == "normal":
            x = rng.normal(self.a, self.b, n)
        elif self.kind == "lognormal":  # the mean and standard deviation of the lengths themselves
            s2 = math.log1p((self.b / self.a) ** 2)
            x = rng.lognormal(math.log(self.a) - s2 / 2, math.sqrt(s2), n)
        else:
            x = rng.exponential(self.a, n)
        return np.clip(np.rint(x), 1, MAX_CONTEXT).astype(np.int64)

    def __str__(self) -> str:
        if self.kind == "const":
            return f"{self.a:g}"
        return f"{self.kind}:{self.a:g}" + (f":{self.b:g}" if self.kind in ("uniform", "normal", "lognormal") else "")


def parse_length(text: str, option: str) -> LengthDist:
    """`--prompt-len` / `--output-len`: N, const:N, uniform:LO:HI, normal:MEAN:SD,
    lognormal:MEAN:SD or exp:MEAN (tokens)."""
    parts = str(text).strip().split(":")
    kind = "const" if len(parts) == 1 else parts[0].lower()
    args = parts if len(parts) == 1 else parts[1:]
    want = {"const": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exp": 1}
    bad = f"{option} {text!r}: expected one of {', '.join(DIST_FORMS)} (tokens)"
    if kind not in want or len(args) != want[kind]:
        raise WseError(bad)
    try:
        v = [float(a) for a in args]
    except ValueError:
        raise WseError(bad) from None
    if not all(math.isfinite(x) for x in v):
        raise WseError(f"{option} {text!r}: values must be finite")
    if v[0] < 1 or v[0] > MAX_CONTEXT:
        raise WseError(f"{option} {text!r}: the {'lower bound' if kind == 'uniform' else 'mean'} must be in "
                       f"[1, {MAX_CONTEXT:,}] tokens")
    if kind == "uniform" and not v[0] <= v[1] <= MAX_CONTEXT:
        raise WseError(f"{option} {text!r}: need LO <= HI <= {MAX_CONTEXT:,}")
    if kind in ("normal", "lognormal") and v[1] < 0:
        raise WseError(f"{option} {text!r}: the standard deviation must be at least 0")
    if kind == "const" and v[0] != int(v[0]):
        raise WseError(f"{option} {text!r}: a fixed length must be a whole number of tokens")
    return LengthDist(kind, *v)


@dataclasses.dataclass(frozen=True)
class Arrivals:
    """Request arrivals: Poisson (cv = 1) or gamma-distributed gaps with coefficient of
    variation cv (cv > 1: bursty)."""

    rate_per_s: float
    cv: float = 1.0

    def __str__(self) -> str:
        return "poisson" if self.cv == 1.0 else f"gamma:{self.cv:g}"

    def draw(self, rng: np.random.Generator, duration_s: float) -> np.ndarray:
        """Arrival times in [0, duration_s)."""
        mean_n = self.rate_per_s * duration_s
        if mean_n > MAX_REQUESTS:
            raise WseError(f"--rate {self.rate_per_s:g} x --duration {duration_s:g} is {mean_n:,.0f} requests; "
                           f"at most {MAX_REQUESTS:,}")
        out, t = [], 0.0
        shape = 1.0 / self.cv ** 2
        n = int(1.1 * mean_n) + 16
        while True:
            times = t + np.cumsum(rng.gamma(shape, 1.0 / (self.rate_per_s * shape), n))
            keep = times[times < duration_s]
            out.append(keep)
            if len(keep) < n:
                return np.concatenate(out)
            t = float(times[-1])


def parse_arrivals(text: str, rate: float) -> Arrivals:
    """`--arrivals poisson` or `gamma:CV` at `--rate` requests/s."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise WseError(f"--rate {rate}: must be a positive number of requests per second")
    t = str(text).strip().lower()
    if t == "poisson":
        return Arrivals(float(rate))
    if t.startswith("gamma:"):
        try:
            cv = float(t[6:])
        except ValueError:
            cv = -1.0
        if math.isfinite(cv) and 0.05 <= cv <= 20:
            return Arrivals(float(rate), cv)
    raise WseError(f"--arrivals {text!r}: expected poisson or gamma:CV with 0.05 <= CV <= 20")


@dataclasses.dataclass(frozen=True)
class Requests:
    """Requests in arrival order: `arrival_s` (seconds from the start), `prompt` and `output`
    tokens (each at least 1)."""

    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def longest(self) -> int:
        """The most tokens one request's KV cache holds (prompt + output)."""
        return int((self.prompt + self.output).max(initial=1))


def generate(arrivals: Arrivals, prompt: LengthDist, output: LengthDist, duration_s: float, seed: int) -> Requests:
    """Seeded requests over [0, duration_s)."""
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise WseError(f"--duration {duration_s}: must be a positive number of seconds")
    rng = np.random.default_rng(seed)
    t = arrivals.draw(rng, duration_s)
    if len(t) == 0:
        raise WseError(f"--rate {arrivals.rate_per_s:g} over --duration {duration_s:g} s drew no request "
                       f"(seed {seed}); raise either")
    p, o = prompt.draw(rng, len(t)), output.draw(rng, len(t))
    return Requests(t, p, o, f"{arrivals} arrivals at {arrivals.rate_per_s:g}/s over {duration_s:g} s, "
                             f"prompt {prompt}, output {output}, seed {seed}")


COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def read_requests(path: str | Path) -> Requests:
    """A CSV file with a header naming arrival_s, prompt_tokens and output_tokens (any order,
    other columns ignored); one error naming the file and row for anything else."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise WseError(f"{path}: cannot read the request file ({type(e).__name__})") from None
    if not rows:
        raise WseError(f"{path}: empty request file; expected a header {','.join(COLUMNS)}")
    head = [h.strip().lower() for h in rows[0]]
    missing = [c for c in COLUMNS if c not in head]
    if missing:
        raise WseError(f"{path}: the header lacks {', '.join(missing)} (it has {', '.join(head) or 'nothing'})")
    idx = [head.index(c) for c in COLUMNS]
    t, p, o = [], [], []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) < len(head):
            raise WseError(f"{path}: row {n} has {len(row)} fields, the header {len(head)}")
        try:
            a = float(row[idx[0]])
            pp, oo = (float(row[i]) for i in idx[1:])
        except ValueError:
            raise WseError(f"{path}: row {n}: not a number in {', '.join(row)}") from None
        if not (math.isfinite(a) and a >= 0):
            raise WseError(f"{path}: row {n}: arrival_s {row[idx[0]]} must be a finite time at least 0")
        for name, v in (("prompt_tokens", pp), ("output_tokens", oo)):
            if not (v == int(v) and 1 <= v <= MAX_CONTEXT) if math.isfinite(v) else True:
                raise WseError(f"{path}: row {n}: {name} {v:g} must be a whole number in [1, {MAX_CONTEXT:,}]")
        if t and a < t[-1]:
            raise WseError(f"{path}: row {n}: arrival_s {a:g} is earlier than the row before ({t[-1]:g}); "
                           "rows must be in arrival order")
        t.append(a)
        p.append(int(pp))
        o.append(int(oo))
    if not t:
        raise WseError(f"{path}: no request rows after the header")
    if len(t) > MAX_REQUESTS:
        raise WseError(f"{path}: {len(t):,} requests; at most {MAX_REQUESTS:,}")
    return Requests(np.array(t), np.array(p, dtype=np.int64), np.array(o, dtype=np.int64), f"requests from {path}")
