"""Prefill of an S-token prompt and the time to first token (docs/workloads.md).

Each layer's prefill runs on its own P x Q region (the decode slot: P columns, Q rows; square
by default). Activations are S x H tiles: tokens over rows, hidden over columns. The layer is a
sequence of kernels, each simulated cycle by cycle once and composed kernel after kernel (a
kernel starts when the previous one has finished everywhere, which is what its data dependency
requires):

1. RMSNorm, RoPE, softmax, SiLU*up and residuals: one elementwise kernel with the row
   all-reduces the norms and softmax need (`elementwise`);
2. six GEMMs: QKV (S x H x (q+2kv)), scores (S x q x S), weighted values (S x S x o),
   O (S x o x H), gate/up (S x H x 2F), down (S x F x H). On a square region they are
   MeshGEMMs: weights stored pre-skewed, activation operands aligned first (both operands of
   the two attention GEMMs). On a tall region (or algo "stationary") the weight GEMMs are
   weight-stationary token blocks through the decode GEMV layout and the attention GEMMs SUMMA
   (`mapping`). Multi-head latent attention replaces QKV by three: the query and KV latents
   (S x H x (q_lora + kv_lora + rope)), the query (S x q_lora x q) and the per-head keys and
   values (S x kv_lora x heads (nope + v)); its elementwise kernel adds the two latent norms.
   A MoE layer's FFN is its k routed plus shared experts as one dense FFN of that width.

The attention GEMMs fold the heads into the contraction and output dimensions, which keeps
their FLOPs exact (2 S^2 q and 2 S^2 o); causal masking is not exploited. Between layers the
S x H activations cross to the next region on its Q lanes: S * H/Q wavelets per lane,
pipelined. TTFT = layers x (kernels + transfer) + the LM head's GEMV for the last token.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from ..errors import WseError
from ..hardware import WaferConfig
from ..trace import Trace
from .gemm import ALGOS as GEMM_ALGOS, standalone as gemm_trace, summa_depth, summa_panels
from .gemv import largest_batch, standalone as gemv_trace
from .mesh import split
from .models import ModelSpec
from .params import MAX_CONTEXT
from .prefill_elementwise import elementwise

SUMMA_SETTLE_DEPTHS = 4  # [U] a SUMMA prefix extrapolates from at least this many buffer depths of steps
KEY_KERNELS = ("scores", "values", "elementwise")  # the kernels whose work grows with the keys attended
# a chunk's further key block with --prefill-keys blocked (chunked.py): the attention GEMMs over the block's
# keys and the online softmax between them (prefill_blocks.py)
BLOCK_KERNELS = ("scores", "values", "softmax_block")
KEYED_KERNELS = KEY_KERNELS + ("softmax_block",)  # the kernels whose trace depends on the keys



def ffn_width(spec: ModelSpec) -> int:
    """Feed-forward width a prefill token passes through: the dense FFN, or a MoE layer's
    k routed experts plus its shared experts (each token's experts as one dense FFN; every
    layer of a MoE model is given this width)."""
    if not spec.moe:
        return spec.ffn_size
    return spec.moe.expert_ffn_size * (spec.moe.experts_per_token + spec.moe.shared_experts)


@dataclasses.dataclass(frozen=True)
class Combined:
    """A kernel's cycles as the weighted sum of its simulated pieces (pieces()): a prefix
    extrapolation or a weight-stationary kernel's blocks."""

    total_cycles: int
    parts: tuple[int, ...]  # the pieces' simulated cycles
    complete: bool = True
    stop_name: str = "complete"
    stuck: tuple = ()

    @staticmethod
    def assemble(parts: list[tuple[float, dict[str, int]]], results: list):
        """A kernel's result from its pieces' results: the one result of a whole kernel, else
        their Combined sum."""
        if len(parts) == 1 and parts[0][0] == 1.0:
            return results[0]
        return Combined.of(results, [w for w, _ in parts])

    @classmethod
    def of(cls, results: list, weights: list[float]) -> "Combined":
        parts = tuple(int(r.total_cycles) for r in results)
        for r in results:
            if not r.complete:
                return cls(r.total_cycles, parts, False, r.stop_name, tuple(r.stuck))
        return cls(round(sum(w * c for w, c in zip(weights, parts))), parts)


@dataclasses.dataclass
class PrefillResult:
    ttft_cycles: int
    layer_cycles: int
    kernels: dict[str, int]  # kernel -> cycles (one layer; transfer and lm_head included)
    executed_flops: int
    model_flops: int
    results: dict[str, object]  # kernel -> EngineResult
    traces: dict[str, Trace]


Kernels = Callable[[list[str]], "Iterator[tuple[str, object, dict[str, int], Trace | None]]"]


def prefill(spec: ModelSpec, cfg: WaferConfig, P: int, prompt: int, lm_width: int, layers: int,
            simulate: Callable[[Trace], object], algo: str = "meshgemm", kernels: Kernels | None = None,
            Q: int | None = None, lm_rows: int | None = None, keys: int | None = None,
            precisions: tuple[str, str] = ("bf16", "bf16")) -> PrefillResult:
    """Time to first token of a `prompt`-token prompt on P x Q layer regions (module docstring).
    `kernels(names)`, if given, yields (name, result, facts, trace or None) for the named kernels
    (e.g. from worker processes, system/pool.py); by default each is built and run through
    `simulate` here. keys: the tokens the prompt's queries attend (default the prompt; a chunk
    of a longer prompt attends every token up to its own last, workload/chunked.py). precisions:
    the (dense, routed experts') linear weights (kernel_weights)."""
    H, S, Q = spec.hidden_size, prompt, Q or P
    names = kernel_names(spec) + ["lm_head"]
    if kernels is None:
        def kernels(todo):
            for name in todo:
                w = kernel_weights(spec, name, precisions)
                parts = pieces(spec, cfg, P, prompt, name, algo, Q, keys=keys, weights=w) if name != "lm_head" \
                    else [(1.0, {})]
                built = [kernel_trace(spec, cfg, P, prompt, name, algo, lm_width, Q=Q, lm_rows=lm_rows, keys=keys,
                                      weights=w, **kw)
                         for _, kw in parts]
                r = Combined.assemble(parts, [simulate(tr) for tr, _ in built])
                yield name, r, built[0][1], None if isinstance(r, Combined) else built[0][0]
    cycles: dict[str, int] = {}
    results: dict[str, object] = {}
    facts: dict[str, dict[str, int]] = {}
    traces: dict[str, Trace] = {}
    for name, r, f, tr in kernels(names):
        r = _complete(r, "LM head GEMV" if name == "lm_head" else f"prefill {name} kernel")
        cycles[name], results[name], facts[name] = r.total_cycles, r, f
        if tr is not None:
            traces[name] = tr
    body = [n for n in names if n != "lm_head"]
    kern = {n: cycles[n] for n in body}
    # the S x H activations cross to the next region: S * H/Q wavelets on each of Q lanes, pipelined
    kern["transfer"] = S * max(split(H, Q)) + 2 * Q * cfg.hop_latency_cycles + 2 * cfg.ramp_latency_cycles \
        + cfg.fabric_setup_cycles
    layer = sum(kern.values())
    kern["lm_head"] = cycles["lm_head"]
    head = facts["lm_head"]
    executed = sum(facts[n]["executed_flops"] for n in body) * layers + head["model_flops"] + head["reduce_flops"]
    model = sum(facts[n]["model_flops"] for n in body) * layers + head["model_flops"]
    return PrefillResult(layers * layer + cycles["lm_head"], layer, kern, executed, model, results, traces)


def block_cycles(kernels: Kernels) -> dict[str, int]:
    """A chunk's further key block (BLOCK_KERNELS, --prefill-keys blocked) from a `kernels`
    function for the chunk's tokens at the block's keys: kernel -> cycles."""
    return {n: _complete(r, f"prefill {n} kernel").total_cycles for n, r, _, _ in kernels(list(BLOCK_KERNELS))}


def kernel_names(spec: ModelSpec) -> list[str]:
    """The kernels of one prefill layer, in order."""
    if spec.mla:
        first = ["q_kv_a"] + (["q_b"] if spec.mla.q_lora_rank else []) + ["kv_b"]
    else:
        first = ["qkv"]
    return first + ["scores", "values", "o", "gate_up", "down", "elementwise"]


def kernel_trace(spec: ModelSpec, cfg: WaferConfig, P: int, prompt: int, name: str, algo: str = "meshgemm",
                 lm_width: int | None = None, steps: int | None = None, Q: int | None = None,
                 batch: int | None = None, record: bool = False, lm_rows: int | None = None,
                 keys: int | None = None, weights: str = "bf16") -> tuple[Trace, dict[str, int]]:
    """One prefill kernel (kernel_names, "softmax_block": a chunk's further key block's online
    softmax, prefill_blocks.py, or "lm_head": the last token's LM-head GEMV on an
    lm_width x lm_rows region, default P rows) on a P x Q layer region: (trace, facts). A
    kernel the prompt makes too big for the region's SRAM is an error naming --prompt-len. GEMMs
    run as `mapping` says: `steps` builds a MeshGEMM/Cannon/SUMMA kernel's first steps only (gemm.standalone); a
    weight-stationary kernel's trace is one block of `batch` tokens (default: the largest,
    stationary_block) while its facts are the whole kernel's. record: the elementwise kernel
    records its /tensors too (the GEMMs always do). keys: the tokens attended (default the
    prompt's; the attention GEMMs and the softmax span them). weights: the precision a weight GEMM's
    weights are stored at (kernel_weights; below 16 bits it runs weight-stationary, `mapping`)."""
    Q = Q or P
    try:
        return _kernel_trace(spec, cfg, P, prompt, name, algo, lm_width, steps, Q, batch, record, lm_rows, keys,
                             weights)
    except WseError as e:
        if "--prompt-len" in str(e) or "--prefill-chunk" in str(e) or "SRAM" not in str(e):
            raise
        what = f"--prompt-len {prompt}" if keys in (None, prompt) else f"--prefill-chunk {prompt} at {keys:,} keys"
        raise WseError(f"{what}: the prefill {name} kernel does not fit a {P}x{Q} region: {e}") from None


ATTENTION_GEMMS = ("scores", "values")  # activations times activations: no stationary weights
FFN_GEMMS = ("gate_up", "down")


def kernel_weights(spec: ModelSpec, name: str, precisions: tuple[str, str]) -> str:
    """The precision a prefill kernel's weights are stored at, of the (dense, routed experts')
    precisions the decode step stores: the FFN GEMMs take the routed experts' in a MoE model (its
    prefill FFN stands for the chosen experts, module docstring; a dense layer's FFN there too),
    the other weight GEMMs the dense one; the LM head and the kernels without weights 16 bits."""
    if name in ATTENTION_GEMMS or not is_gemm(name):
        return "bf16"
    return precisions[1] if name in FFN_GEMMS and spec.moe else precisions[0]


def mapping(algo: str, P: int, Q: int, name: str, weights: str = "bf16") -> str:
    """How a prefill GEMM kernel runs on a P x Q region. `algo` meshgemm, cannon or summa: that
    algorithm on a square region. A tall region (MeshGEMM and Cannon need a square grid), algo
    `stationary`, or weights below 16 bits (the MeshGEMM/Cannon/SUMMA kernels move 16-bit tiles;
    a stationary tile is dequantized in place, as the decode GEMVs do): the weight GEMMs
    weight-stationary (token blocks through the decode GEMV layout, stationary_block), the
    attention GEMMs as SUMMA (MeshGEMM on a square region)."""
    if algo not in (*GEMM_ALGOS, "stationary"):
        raise WseError(f"unknown prefill GEMM algorithm {algo!r} ({', '.join(GEMM_ALGOS)}, stationary)")
    if algo == "stationary" or P != Q or (weights != "bf16" and name not in ATTENTION_GEMMS):
        if name in ATTENTION_GEMMS:
            return "summa" if P != Q else "meshgemm"
        return "stationary"
    return algo


def stationary_block(spec: ModelSpec, cfg: WaferConfig, P: int, Q: int, prompt: int, name: str,
                     weights: str = "bf16") -> int:
    """Tokens per block of a weight-stationary prefill GEMM: the most (up to the prompt) whose
    inputs, outputs and reduction scratch fit beside the kernel's weight tile (stored at
    `weights`)."""
    _, k, n, _, _ = _gemm_shape(spec, prompt, name)
    b = largest_batch(k, n, P, Q, cfg, prompt, weights)
    if b < 1:
        try:
            gemv_trace(k, n, P, Q, cfg, weights=weights)  # the fit error naming the bytes
        except WseError as e:
            raise WseError(f"the prefill {name} kernel does not fit a {P}x{Q} region: {e}") from None
        raise WseError(f"the prefill {name} kernel does not fit a {P}x{Q} region")
    return b


def _kernel_trace(spec: ModelSpec, cfg: WaferConfig, P: int, prompt: int, name: str, algo: str,
                  lm_width: int | None, steps: int | None, Q: int, batch: int | None, record: bool = False,
                  lm_rows: int | None = None, keys: int | None = None, weights: str = "bf16"
                  ) -> tuple[Trace, dict[str, int]]:
    if prompt < max(P, Q):
        raise WseError(f"--prompt-len {prompt} is shorter than the region's longer side {max(P, Q)}: every row "
                       "(and every key column) needs a token")
    H, S = spec.hidden_size, prompt
    if name == "lm_head":
        return gemv_trace(H, spec.vocab_size, lm_width or P, lm_rows or P, cfg)
    if keys is not None and not S <= keys <= MAX_CONTEXT:
        raise WseError(f"prefill keys {keys}: from the prompt's {S} tokens to {MAX_CONTEXT:,}")
    if name == "elementwise":
        return elementwise(spec, P, S, cfg, Q=Q, record=record, keys=keys)
    if name == "softmax_block":
        from .prefill_blocks import softmax_block
        return softmax_block(spec, P, S, cfg, Q=Q, record=record, keys=keys)
    if name not in kernel_names(spec):
        raise WseError(f"{spec.name} has no prefill kernel {name!r}")
    mm, k, n, a, b = _gemm_shape(spec, S, name, keys)
    weights = weights if name not in ATTENTION_GEMMS else "bf16"
    how = mapping(algo, P, Q, name, weights)
    if how != "stationary":
        return gemm_trace(mm, k, n, P, cfg, how, a, b, steps=steps, Q=Q)
    block = batch or stationary_block(spec, cfg, P, Q, S, name, weights)
    tr, f = gemv_trace(k, n, P, Q, cfg, batch=block, weights=weights)
    model = 2 * S * k * n
    # each block dequantizes the tile once (pieces: as few blocks as fit, the prompt over them)
    dequant = f["dequant_flops"] * -(-S // stationary_block(spec, cfg, P, Q, S, name, weights))
    return tr, {"model_flops": model, "executed_flops": model + (Q - 1) * n * S + dequant, "block_tokens": block,
                "block_executed_flops": f["model_flops"] + f["reduce_flops"] + f["dequant_flops"],
                "sram_bytes_per_pe": f["sram_bytes_per_pe"]}


def _gemm_shape(spec: ModelSpec, S: int, name: str, keys: int | None = None) -> tuple[int, int, int, bool, bool]:
    """(m, k, n, align A, align B) of a prefill GEMM kernel for an S-token prompt whose queries
    attend `keys` tokens (default S)."""
    H, K = spec.hidden_size, keys or S
    ffn = ffn_width(spec)
    m = spec.mla  # MLA: the latent form without weight absorption, keys and values materialized
    shapes = {  # (the KV latent plus the shared RoPE key: what the cache holds per token)
        "q_kv_a": lambda: (S, H, (m.q_lora_rank or spec.q_size) + spec.kv_cache_width, True, False),
        "q_b": lambda: (S, m.q_lora_rank, spec.q_size, True, False),
        "kv_b": lambda: (S, m.kv_lora_rank, spec.heads * (m.qk_nope_head_dim + m.v_head_dim), True, False),
        "qkv": lambda: (S, H, spec.q_size + 2 * spec.kv_size, True, False),
        "scores": lambda: (S, spec.q_size, K, True, True),
        "values": lambda: (S, K, spec.attn_out_size, True, True),
        "o": lambda: (S, spec.attn_out_size, H, True, False),
        "gate_up": lambda: (S, H, 2 * ffn, True, False),
        "down": lambda: (S, ffn, H, True, False),
    }
    return shapes[name]()


def is_gemm(name: str) -> bool:
    """Whether a prefill kernel is a GEMM (steps of one pattern: prefix-extrapolable)."""
    return name not in ("elementwise", "softmax_block", "lm_head")


def gemm_steps(spec: ModelSpec, cfg: WaferConfig, P: int, prompt: int, name: str, algo: str = "meshgemm",
               Q: int | None = None, keys: int | None = None) -> int:
    """How many steps a MeshGEMM/Cannon/SUMMA prefill kernel takes on a P x Q region: P, or
    SUMMA's panel count."""
    Q = Q or P
    if mapping(algo, P, Q, name) != "summa":
        return P
    m, k, n, _, _ = _gemm_shape(spec, prompt, name, keys)
    return summa_panels(m, k, n, P, Q, cfg)


def pieces(spec: ModelSpec, cfg: WaferConfig, P: int, prompt: int, name: str, algo: str = "meshgemm",
           Q: int | None = None, prefix: int = 0, keys: int | None = None,
           weights: str = "bf16") -> list[tuple[float, dict[str, int]]]:
    """What to simulate for a kernel and how its cycles follow: [(weight, kernel_trace keyword
    arguments)], cycles = sum of weight x simulated cycles. A weight-stationary GEMM: its token
    blocks (as few as fit, sizes differing by at most one), one after another (each starts when
    the block before has finished everywhere, as the prefill's kernels do). A MeshGEMM/Cannon/SUMMA kernel with
    `prefix` below half its steps: its first k1 = prefix / 2 and k2 = 2 k1 steps, extrapolated
    linearly (c1 + (T - k1)(c2 - c1)/(k2 - k1)); for SUMMA k1 is at least SUMMA_SETTLE_DEPTHS
    times its buffer depth. Otherwise (2 k2 >= T) the whole kernel. weights: the kernel's
    (kernel_weights)."""
    Q = Q or P
    if not is_gemm(name):
        return [(1.0, {})]
    if mapping(algo, P, Q, name, weights) == "stationary":
        blocks = -(-prompt // stationary_block(spec, cfg, P, Q, prompt, name, weights))
        lo, big = divmod(prompt, blocks)  # `big` blocks of lo + 1 tokens, the rest of lo
        return [(float(n), {"batch": size}) for n, size in ((big, lo + 1), (blocks - big, lo)) if n]
    T = gemm_steps(spec, cfg, P, prompt, name, algo, Q, keys)
    k1 = prefix // 2
    if prefix and mapping(algo, P, Q, name) == "summa":
        # its relays run up to `depth` steps ahead of the compute: the steps settle only once
        # several depths of them have filled the pipeline (docs/serving.md)
        m, k, n, _, _ = _gemm_shape(spec, prompt, name, keys)
        k1 = max(k1, SUMMA_SETTLE_DEPTHS * summa_depth(m, k, n, P, Q, T, cfg))
    k2 = 2 * k1
    if not prefix or 2 * k2 >= T:
        return [(1.0, {})]
    slope = (T - k1) / (k2 - k1)
    return [(1.0 - slope, {"steps": k1}), (slope, {"steps": k2})]


def kernel_traces(spec: ModelSpec, cfg: WaferConfig, P: int, prompt: int, algo: str = "meshgemm",
                  Q: int | None = None, record: bool = False) -> dict[str, tuple[Trace, dict[str, int]]]:
    """The kernels of one prefill layer: name -> (trace, facts)."""
    return {name: kernel_trace(spec, cfg, P, prompt, name, algo, Q=Q, record=record) for name in kernel_names(spec)}


def _complete(r, what: str):
    if not r.complete:
        raise WseError(f"{what} did not complete ({r.stop_name}): " + "; ".join(r.stuck[:3]))
    return r
