"""A whole decode step's tensors (/tensors) and its numpy reference, for `wse check --model M
--full`: the embedding lookup, every layer (layer_tensors, names prefixed `layer<L>.`, h arriving
by the lanes), the final RMSNorm, the logits, each sequence's greedy logit and token — one trace,
one functional run, so the lanes between regions are checked too. A wafer's share of a model
split over several wafers (`--wafers`) is checked the same way: without the embedding its first
layer's h is an input (what the link brings), without the LM head its last layer's output ends
it; cut inside a layer's routed experts, a share begins with the dispatch and the combine so far
from the stand-in for the layer region before (inputs) and ends with the combine so far
(`combine_out`)."""
from __future__ import annotations

import numpy as np

from ..errors import WseError
from .gemv import ELEM
from .layer_tensors import Prefixed, functional_gap, record_experts, record_layer, reference as layer_reference
from .mesh import offsets, split
from .region import C_EPS, C_INV_H, NORM_EPS
from .tables import FP32, NOT_FOUND


def step_gap(plan) -> str | None:
    """Why a model plan's decode step cannot be checked yet (None: it can)."""
    from .chain import chain_of
    from .decode import layer_plan
    from .stages import standin_buffers
    if any(s.kind not in ("embedding", "layer", "ffn", "lm_head", "experts") for s in plan.slots):
        return f"slots of kinds {sorted({s.kind for s in plan.slots})}"
    ch = chain_of(plan)
    if ch.leading and len(set(standin_buffers(plan).values())) < 3:
        return f"batch {plan.params.batch}: the stand-in for the layer region before has no room for its sends"
    prm = plan.params
    for layer in range(plan.first_layer, plan.first_layer + plan.n_layers):
        gap = functional_gap(plan.spec, layer, prm, layer_plan(plan, layer), in_step=True)
        if gap:
            return f"layer {layer}: {gap}"
    return None


def step_trace(plan):
    """The full decode-step trace of a model plan with its /tensors (WseError when not checkable)."""
    from .stages import full_trace
    gap = step_gap(plan)
    if gap:
        raise WseError(f"{plan.spec.name} decode step: not checkable functionally: {gap}")
    trace, _ = full_trace(plan, record=lambda b, slots: _record(b, plan, slots))
    return trace


def _record(b, plan, slots) -> None:
    from .chain import chain_of
    from .decode import ffn_plan, layer_plan
    from .experts import plan_experts
    from .tables import embedding_memory, lm_memory
    spec, prm, W = plan.spec, plan.params, b.width
    b.meta.update(kernel="decode_step", token=str(prm.token), expert_skew=str(prm.expert_skew),
                  first_layer=str(plan.first_layer), embed=str(int(plan.embed)), head=str(int(plan.head)))
    ch = chain_of(plan)
    roles = ch.roles  # (expert regions: which one is its layer's collector)
    for key, g in (("lead", ch.leading), ("trail", ch.trailing)):  # a layer's experts across wafers
        if g is not None:
            parts = [plan.slots[e] for e in g.experts]
            b.meta.update({f"{key}_layer": str(parts[0].index),
                           f"{key}_experts": f"{parts[0].experts[0]},{parts[-1].experts[1]}"})
    if ch.leading:
        _record_standin(b.tensors, plan, slots[0], W)
    for s, slot in enumerate(slots):
        R = slot.region
        ii, jj = np.meshgrid(np.arange(R.width), np.arange(R.height))
        pe, col, row = ((R.y0 + jj) * W + R.x0 + ii).reshape(-1), ii.reshape(-1), jj.reshape(-1)
        if slot.kind == "layer":
            record_layer(Prefixed(b.tensors, f"layer{slot.index}."), layer_plan(plan, slot.index), plan.P,
                         (W, R.x0, R.y0), h_input=not plan.embed and s == 0)
        elif slot.kind == "ffn":  # a split layer's FFN: h after attention arrives from its layer region
            record_layer(Prefixed(b.tensors, f"layer{slot.index}."), ffn_plan(plan, slot.index), plan.P,
                         (W, R.x0, R.y0), h_input=False)
        elif slot.kind == "experts":
            ep = plan_experts(spec, slot.index, slot.experts, plan.P, plan.cfg, prm, plan.Q)
            record_experts(Prefixed(b.tensors, f"layer{slot.index}."), ep, (W, R.x0, R.y0),
                           roles[s].collector, bool(ep.local_experts()), roles[s].last and not roles[s].collector)
        elif slot.kind == "embedding":
            mem, Hr, buf = embedding_memory(spec, R.width, R.height, plan.cfg, prm)
            _record_embedding(b.tensors, spec, buf["table"], split(spec.vocab_size, R.width), Hr, pe, col, row)
        else:
            mem, shape, Hr, Vc, buf = lm_memory(spec, R.width, R.height, plan.cfg, prm)
            _record_head(b.tensors, spec, prm.batch, shape, Hr, Vc, buf, pe, col, row)


def _record_standin(t, plan, first, W: int) -> None:
    """A leading part's inputs: what the stand-in for its layer region (P columns west of the
    wafer's first slot) sends, lane d from its PE (d, d): the FFN input chunk d per sequence and
    the batch's gates (the dispatch), then chunk d of the combine so far."""
    from .stages import standin_buffers
    spec, B, k = plan.spec, plan.params.batch, plan.spec.moe.experts_per_token
    H, Hc = spec.hidden_size, split(spec.hidden_size, plan.P)
    ho = offsets(Hc)
    buf = standin_buffers(plan)
    x0, y0 = first.region.x0 - plan.P, first.region.y0
    p = f"layer{first.index}."
    xn, gates, comb = (t.add(p + n, "input", shape) for n, shape in (
        ("dispatch_xn", (B, H)), ("dispatch_gates", (B, k)), ("combine_in", (B, H))))
    for d, hi in enumerate(Hc):
        pe = (y0 + d) * W + x0 + d
        t.pieces(gates, pe, buf["gates"], k * B, 0)
        for b in range(B):
            t.pieces(xn, pe, buf["xn"] + b * hi * ELEM, hi, b * H + ho[d])
            t.pieces(comb, pe, buf["h"] + b * hi * ELEM, hi, b * H + ho[d])


def _record_embedding(t, spec, table: int, Vc: list[int], Hr: list[int], pe, col, row) -> None:
    """The table [vocab, hidden]: PE (i, j) holds vocab slice i's rows, hidden chunk j of each."""
    H, vc, hr = spec.hidden_size, np.array(Vc), np.array(Hr)
    vo, ho = np.array(offsets(Vc)), np.array(offsets(Hr))
    pitch = -(-max(Hr) * ELEM // 8) * 8
    k = t.add("embedding", "weight", (spec.vocab_size, H))
    for v in range(int(vc.max())):
        m = vc[col] > v
        t.pieces(k, pe[m], table + v * pitch, hr[row[m]], (vo[col[m]] + v) * H + ho[row[m]])


def _record_head(t, spec, B: int, shape, Hr: list[int], Vc: list[int], buf: dict, pe, col, row) -> None:
    """The final norm's weight, W_lm [hidden, vocab] (tile of PE (i, j): hidden chunk j x vocab
    slice i), the logits [batch, vocab] (slice i down column i) and each sequence's largest."""
    H, V = spec.hidden_size, spec.vocab_size
    hr, vc = np.array(Hr), np.array(Vc)
    ho, vo = np.array(offsets(Hr)), np.array(offsets(Vc))
    t.pieces(t.add("final_norm", "weight", (H,)), pe, buf["g"], hr[row], ho[row])
    w = t.add("lm_head", "weight", (H, V))
    for r in range(int(hr.max())):
        m = hr[row] > r
        t.pieces(w, pe[m], shape.weights + r * shape.pitch, vc[col[m]], (ho[row[m]] + r) * V + vo[col[m]])
    logits = t.add("logits", "output", (B, V))
    for b in range(B):
        t.pieces(logits, pe, buf["logits"] + b * vc[col] * ELEM, vc[col], b * V + vo[col])
    t.pieces(t.add("best_logit", "output", (B,)), pe, buf["best"], B, 0)
    t.pieces(t.add("token", "output", (B,), FP32), pe, buf["token"], B, 0)
    t.pieces(t.add("head.vocab0", "index", (V,), FP32), pe, buf["vocab0"], 1, vo[col])
    t.pieces(t.add("head.none", "constant", (1,), FP32, value=NOT_FOUND), pe, buf["none"], 1, 0)
    t.pieces(t.add("head.zero32", "zero", (B,), FP32), pe, buf["zero32"], B, 0)
    z = buf["zeros"]
    t.pieces(t.add("head.zeros", "zero", (max(max(Hr), max(Vc)) * B,)), pe, z, max(max(Hr), max(Vc)) * B, 0)
    for name, c, v in (("head.inv_hidden", C_INV_H, 1 / H), ("head.norm_eps", C_EPS, NORM_EPS)):
        t.pieces(t.add(name, "constant", (1,), value=v), pe, buf["consts"] + c * ELEM, 1, 0)


def reference(meta: dict, x: dict) -> dict:
    """The decode step in float64: embedding rows of tokens token..token + batch - 1 (a share
    without the embedding: its first layer's h), every layer (layer_tensors.reference), and with
    the LM head the final RMSNorm, the logits, their maximum and the greedy token (`token@scores`:
    the logits it is checked against: a near-tie may pick either)."""
    B, token, first = int(meta["batch"]), int(meta["token"]), int(meta.get("first_layer", 0))
    lead = int(meta["lead_layer"]) if "lead_layer" in meta else None
    out = {}
    if meta.get("embed", "1") == "1":
        h = x["embedding"][token + np.arange(B)]
    elif lead is None:
        h = x[f"layer{first}.h"]
    for layer in range(first, first + int(meta["layers"])):
        p = f"layer{layer}."
        sub = {k[len(p):]: v for k, v in x.items() if k.startswith(p)}
        if layer == lead:  # the rest of a layer begun on the wafer before: its experts here, added to the combine
            from .layer_tensors import routed_sum
            from .models import spec_of
            h = sub["combine_in"] + routed_sum(spec_of(meta), layer, float(meta.get("expert_skew", 0)), sub,
                                               sub["dispatch_xn"], sub["dispatch_gates"],
                                               tuple(int(v) for v in meta["lead_experts"].split(",")))
            out[p + "out"] = h
            continue
        lm = {"model": meta["model"], "model_file": meta.get("model_file", ""), "layer": str(layer),
              "expert_skew": meta.get("expert_skew", "0")}
        if meta.get("trail_layer") == str(layer):  # its experts continue on the next wafer
            lm["experts"] = meta["trail_experts"]
        r = layer_reference(lm, dict(sub, h=h))
        out.update({p + k: v for k, v in r.items()})
        h = r["out"]
    if meta.get("head", "1") != "1":
        return out
    xn = h * x["final_norm"] / np.sqrt((h ** 2).mean(axis=-1, keepdims=True) + NORM_EPS)
    logits = xn @ x["lm_head"]
    return dict(out, logits=logits, best_logit=logits.max(axis=1), token=logits.argmax(axis=1),
                **{"token@scores": logits})
