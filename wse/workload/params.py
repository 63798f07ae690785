"""Decode-step parameters shared by every region generator: batch, context, mapping choices."""
from __future__ import annotations

import dataclasses

from ..errors import WseError
from .precision import WEIGHTS

MOE_MAPPINGS = ("auto", "local", "regions")
SLOT_SHAPES = ("square", "tall")
ATTENTION = ("flash", "classic")
FLASH_BLOCKS = ("auto", "overlapped", "serial")
ALLREDUCE = ("auto", "two-level", "chain")
NORMS = ("fused", "separate")
DENSE_FFN = ("auto", "layer", "region")
TABLES = ("auto", "slots", "strips")
HANDOFF = ("fused", "barrier")
DOWN_GEMV = ("auto", "axpy", "dot")
GEMV_FORM = ("auto", "axpy", "dot")
MAX_CONTEXT = 131_072  # longest context a run may ask for (Llama 3.1's 128k)


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    batch: int = 1
    context: int = 128  # cached tokens attended to, the current one included
    token: int = 1  # token id looked up in the embedding (all sequences of a batch: adjacent ids)
    # line all-reduces: "two-level" (MeshGEMV's), "chain" (one chain to the end), or "auto": two-level,
    # with long vectors in one two-way chain to the same root on the same colors (collectives.py)
    algo: str = "auto"
    groups: int | None = None  # two-level group count (default: divisor of P nearest sqrt P)
    expert_skew: float = 0.0  # MoE expert choice: 0 uniform, s > 0 Zipf-skewed popularity (ffn.moe_experts)
    moe_mapping: str = "auto"  # routed experts: "local" (in the layer region), "regions" (expert regions), "auto"
    experts_per_region: int = 0  # expert regions hold at most this many routed experts (0: as many as fit)
    slot_shape: str = "tall"  # layer and expert slots: "tall" (P x Q, Q >= P, the largest area) or "square"
    uniform_slots: bool = False  # a multi-wafer system: every wafer on one slot shape (system/wafers.py)
    weights: str | None = None  # linear weights' precision (precision.WEIGHTS); None: the model's checkpoint
    attention: str = "flash"  # decode attention: "flash" (blocked, online softmax) or "classic" (attention.py)
    attention_block: int = 0  # flash: cached tokens per block and column (0: attention.block_tokens)
    # flash: a block's score reduction on a thread of its own, overlapping the previous block's softmax
    # ("overlapped"), each block in turn ("serial"; flash._run_blocks), or "auto": overlapped where
    # its second score buffer fits the slot
    flash_blocks: str = "auto"
    norms: str = "fused"  # RMSNorm's mean square in the next GEMV's all-reduce ("fused") or its own
    # a dense layer's FFN: in its layer region ("layer"), in a slot of its own after it ("region"),
    # or "auto": in a slot of its own where a MoE model's routed experts are in expert regions
    dense_ffn: str = "auto"
    # the embedding and the LM head: in slots of the bands ("slots"), in strips as wide as the
    # mesh above and below the bands ("strips"), or "auto": strips only where slots place nothing
    tables: str = "auto"
    # how a region hands the token on exactly (composition's anchor): its sync nested in the FFN's
    # down all-reduce where a dense FFN ends the region ("fused"), or a barrier of its own
    # ("barrier": a one-element all-reduce over the region after everything else)
    handoff: str = "fused"
    # the FFN's down GEMV tiles: stored by input row, one FMAC per input element ("axpy"), or by
    # output, one DOT per output element ("dot"); "auto": whichever takes fewer cycles
    down_gemv: str = "auto"
    # latent attention: the region's rows in this many groups, each holding every latent dim for its
    # share of the context's tokens (mla.py): G x fewer tokens per PE to score, reduce and softmax,
    # at G x the absorbed query, W_uk, W_uv and the new token's latent computed in every group
    mla_groups: int = 1
    # every other weight GEMV tile that runs as gemv.gemv_ops (QKV, O, router, gate/up, latent
    # attention's W_a, W_qb, W_o; the expert regions' gate/up and down), and low-precision down
    # tiles under down_gemv "auto": as down_gemv. "axpy" (default) is the mapping before the
    # option; "auto" is faster but pads some tiles more (Kimi K2 then needs a wafer more)
    gemv_form: str = "axpy"

    def __post_init__(self) -> None:
        if self.moe_mapping not in MOE_MAPPINGS:
            raise WseError(f"--moe-mapping {self.moe_mapping!r} is not one of {', '.join(MOE_MAPPINGS)}")
        if self.slot_shape not in SLOT_SHAPES:
            raise WseError(f"--slot-shape {self.slot_shape!r} is not one of {', '.join(SLOT_SHAPES)}")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise WseError(f"--weights {self.weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.algo not in ALLREDUCE:
            raise WseError(f"all-reduce algorithm {self.algo!r} is not one of {', '.join(ALLREDUCE)}")
        if self.attention not in ATTENTION:
            raise WseError(f"--attention {self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.flash_blocks not in FLASH_BLOCKS:
            raise WseError(f"--flash-blocks {self.flash_blocks!r} is not one of {', '.join(FLASH_BLOCKS)}")
        if self.norms not in NORMS:
            raise WseError(f"--norms {self.norms!r} is not one of {', '.join(NORMS)}")
        if self.dense_ffn not in DENSE_FFN:
            raise WseError(f"--dense-ffn {self.dense_ffn!r} is not one of {', '.join(DENSE_FFN)}")
        if self.tables not in TABLES:
            raise WseError(f"--tables {self.tables!r} is not one of {', '.join(TABLES)}")
        if self.down_gemv not in DOWN_GEMV:
            raise WseError(f"--down-gemv {self.down_gemv!r} is not one of {', '.join(DOWN_GEMV)}")
        if self.gemv_form not in GEMV_FORM:
            raise WseError(f"--gemv-form {self.gemv_form!r} is not one of {', '.join(GEMV_FORM)}")
        if self.mla_groups < 1:
            raise WseError(f"--mla-groups {self.mla_groups} must be at least 1")
        if self.handoff not in HANDOFF:
            raise WseError(f"--handoff {self.handoff!r} is not one of {', '.join(HANDOFF)}")
        if self.attention_block < 0:
            raise WseError(f"--attention-block {self.attention_block} must be at least 0 (0: automatic)")
        if not 1 <= self.context <= MAX_CONTEXT:
            raise WseError(f"--context {self.context} must be in [1, {MAX_CONTEXT:,}]")
        if self.experts_per_region < 0:
            raise WseError(f"--experts-per-region {self.experts_per_region} must be at least 0")
        if self.batch < 1:
            raise WseError(f"--batch {self.batch} must be at least 1")
        if not (isinstance(self.expert_skew, (int, float)) and 0 <= self.expert_skew < float("inf")):
            raise WseError(f"--expert-skew {self.expert_skew} must be a finite number at least 0 (0: uniform)")
        if self.groups is not None and self.groups < 1:
            raise WseError(f"--groups {self.groups} must be at least 1")
