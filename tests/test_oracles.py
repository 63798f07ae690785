"""Closed-form oracles (docs/model.md section 2): exact cycle counts for the synthetic patterns,
and the counters they imply, over several distances, lengths and wafer configurations."""
import math

import numpy as np
import pytest

from wse import hardware, isa
from wse.engine.run import simulate
from wse.workload import synthetic as syn

CONFIGS = {
    "tiny": [],  # hop 2, ramp 2, depth 4, 8-wide fp16
    "tiny2": [],  # hop 1, ramp 2, depth 4, 4-wide fp16
    "tiny-slow-hops": ["fabric.hop_latency_cycles=3", "fabric.ramp_latency_cycles=1",
                       "compute.fabric_setup_cycles=5", "compute.vector_setup_cycles=13"],
}


def config(name: str) -> hardware.WaferConfig:
    return hardware.load_preset(name.split("-")[0]).with_overrides(CONFIGS[name])


def consts(cfg):
    return cfg.fabric_setup_cycles, cfg.ramp_latency_cycles, cfg.hop_latency_cycles


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("hops", [1, 2, 5, 7])
@pytest.mark.parametrize("n", [1, 3, 64, 500])
def test_stream(name, hops, n):
    """cycles = hop_latency * D + N + C with C = fabric_setup + 2 * ramp_latency."""
    cfg = config(name)
    F, R, L = consts(cfg)
    r = simulate(syn.stream(8, 4, n, hops), cfg)
    assert r.complete
    assert r.total_cycles == L * hops + n + (F + 2 * R)
    assert r.pe("wavelets_sent").sum() == r.pe("wavelets_received").sum() == n
    east = r.link("wavelets")[0, :, isa.PORT_EAST]
    assert list(east[:hops]) == [n] * hops and east[hops:].sum() == 0
    assert r.link("blocked_cycles").sum() == 0 and r.link("contention_cycles").sum() == 0
    # the sender streams one wavelet per cycle after its setup
    assert r.pe("busy_cycles")[0, 0] == n and r.pe("setup_cycles")[0, 0] == F
    assert r.pe("sram_read_bytes")[0, 0] == 2 * n and r.pe("sram_write_bytes")[0, hops] == 2 * n


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n", [1, 10, 300])
def test_neighbor_carries_one_wavelet_per_cycle_per_link(name, n):
    """Every PE streams to its east neighbour at full rate: cycles = F + 2R + L + N."""
    cfg = config(name)
    F, R, L = consts(cfg)
    r = simulate(syn.neighbor(8, 8, n, colors=3), cfg)
    assert r.total_cycles == F + 2 * R + L + n
    east = r.link("wavelets")[:, :, isa.PORT_EAST]
    assert (east[:, :-1] == n).all() and (east[:, -1] == 0).all()
    assert r.link("blocked_cycles").sum() == 0 and r.link("contention_cycles").sum() == 0
    assert (r.pe("stall_send_cycles") == 0).all()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("hops", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 7, 200])
def test_contention_shares_the_link_fairly(name, hops, n):
    """Two streams over one link: cycles = 2N + F + 2R + (D + 2) L; each gets every other slot."""
    cfg = config(name)
    F, R, L = consts(cfg)
    r = simulate(syn.contention(8, 4, n, hops), cfg)
    assert r.total_cycles == 2 * n + F + 2 * R + (hops + 2) * L
    finish_a = r.pe("finish_cycle")[1, hops + 2]
    finish_b = r.pe("finish_cycle")[0, hops + 1]
    # round robin: the two streams finish one slot apart, whatever N is
    assert finish_b - finish_a == 1
    shared = r.link("wavelets")[1, 1:hops + 1, isa.PORT_EAST]
    assert (shared == 2 * n).all()
    # both streams have a wavelet waiting at the shared router in every slot but the last
    assert r.link("contention_cycles")[1, 1, isa.PORT_EAST] == 2 * n - 1
    # backpressure from the half-rate link shows only on the two feeding links
    blocked = r.link("blocked_cycles").copy()
    blocked[1, 0, isa.PORT_EAST] = blocked[2, 1, isa.PORT_NORTH] = 0
    assert blocked.sum() == 0


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("hops", [1, 3, 7])
@pytest.mark.parametrize("n", [1, 20, 333])
def test_broadcast(name, hops, n):
    """Multicast along a row: cycles = F + 2R + L * D + N; every receiver gets N."""
    cfg = config(name)
    F, R, L = consts(cfg)
    r = simulate(syn.broadcast(8, 2, n, hops), cfg)
    assert r.total_cycles == F + 2 * R + L * hops + n
    assert list(r.pe("wavelets_received")[0, 1:hops + 1]) == [n] * hops
    assert r.pe("wavelets_sent").sum() == n


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("hops", [1, 2, 6])
@pytest.mark.parametrize("n", [1, 16, 250])
def test_chain_reduce(name, hops, n):
    """Pipelined chain: cycles = F + D (2R + L) + N, i.e. (2 T_R + hop) per stage plus N."""
    cfg = config(name)
    F, R, L = consts(cfg)
    r = simulate(syn.chain_reduce(8, 2, n, hops), cfg)
    assert r.total_cycles == F + hops * (2 * R + L) + n
    # one add per element per receiving stage
    assert r.pe("flops").sum() == hops * n
    assert r.pe("wavelets_received").sum() == hops * n


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 1000])
def test_compute(name, n):
    """One fp16 FMAC of N elements: cycles = vector_setup + ceil(N / E), E = SIMD width."""
    cfg = config(name)
    e = min(cfg.simd_width(isa.KIND_FMAC, isa.DTYPE_FP16), cfg.sram_port_bytes // 2)
    r = simulate(syn.compute_pattern(4, 4, n), cfg)
    assert r.total_cycles == cfg.vector_setup_cycles + math.ceil(n / e)
    assert (r.pe("flops") == 2 * n).all()
    assert (r.pe("sram_read_bytes") == 4 * n).all() and (r.pe("sram_write_bytes") == 2 * n).all()
    assert (r.pe("busy_cycles") == math.ceil(n / e)).all()


def test_compute_bank_conflict_halves_throughput(tiny):
    """Two read streams in the same bank group serialize: two cycles per step."""
    from wse.trace import TraceBuilder, compute
    n = 100
    e = min(tiny.simd_width(isa.KIND_FMAC, isa.DTYPE_FP16), tiny.sram_port_bytes // 2)
    for src0, cycles in ((1024 + 4, math.ceil(n / e)), (1024 + 8, 2 * math.ceil(n / e))):
        b = TraceBuilder(1, 1)
        b.assign(0, 0, 0, [compute(isa.KIND_FMAC, n, dst=0, src0=src0)])
        r = simulate(b.build(), tiny)
        assert r.total_cycles == tiny.vector_setup_cycles + cycles, src0


@pytest.mark.parametrize("depth, latency", [(1, 1), (1, 2), (2, 2), (2, 3)])
def test_shallow_queues_throttle_to_depth_over_round_trip(depth, latency):
    """With depth < latency + 1 a hop sustains depth / (latency + 1) wavelets per cycle."""
    cfg = hardware.load_preset("tiny").with_overrides([
        f"fabric.queue_depth_wavelets={depth}", f"fabric.hop_latency_cycles={latency}",
        f"fabric.ramp_latency_cycles={latency}"])
    t = [simulate(syn.stream(8, 1, n, 3), cfg).total_cycles for n in (60, 120)]
    assert (t[1] - t[0]) * depth == 60 * (latency + 1)


def test_conservation_on_every_pattern(tiny):
    for tr in (syn.stream(8, 8, 50, 6), syn.neighbor(8, 8, 40), syn.contention(8, 8, 30, 3),
               syn.broadcast(8, 8, 25), syn.chain_reduce(8, 8, 70)):
        r = simulate(tr, tiny)
        assert r.complete
        sent, received = r.pe("wavelets_sent").sum(), r.pe("wavelets_received").sum()
        multicast_copies = {"broadcast": 7}.get(tr.meta["pattern"], 1)
        assert received == sent * multicast_copies
        assert (r.pe("peak_queue_wavelets") <= tiny.queue_depth_wavelets).all()
        classes = r.pe_counters[:, :, isa.C_BUSY:isa.C_STALL_SYNC + 1].sum(axis=2)
        assert (classes + r.idle_cycles() == r.total_cycles).all()
        assert np.all(r.idle_cycles() >= 0)
