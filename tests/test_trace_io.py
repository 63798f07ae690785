"""Traces: program deduplication, HDF5 round trip, validation against a wafer, file errors."""
from __future__ import annotations

import re
import shutil

import h5py
import numpy as np
import pytest

from wse import hardware, isa, op_codes
from wse import trace as T
from wse.trace_check import validate
from wse.errors import TraceError, WseError
from wse.trace import TraceBuilder, compute, recv, recv_compute, send, signal, wait
from wse.workload import synthetic

N, S, E, W, R = isa.PORT_NORTH, isa.PORT_SOUTH, isa.PORT_EAST, isa.PORT_WEST, isa.PORT_RAMP


@pytest.fixture(scope="module")
def tiny():
    return hardware.load_preset("tiny")


def _assert_same_trace(a: T.Trace, b: T.Trace) -> None:
    assert (a.mesh_width, a.mesh_height) == (b.mesh_width, b.mesh_height)
    for name, dt in T.ROUTE_COLUMNS:
        assert b.routes[name].dtype == np.dtype(dt), name
        np.testing.assert_array_equal(a.routes[name], b.routes[name])
    for name, dt in T.OP_COLUMNS:
        assert b.ops[name].dtype == np.dtype(dt), name
        np.testing.assert_array_equal(a.ops[name], b.ops[name])
    np.testing.assert_array_equal(a.prog_start, b.prog_start)
    np.testing.assert_array_equal(a.prog_len, b.prog_len)
    np.testing.assert_array_equal(a.pe_program, b.pe_program)
    assert a.pe_program.shape == b.pe_program.shape
    assert a.meta == b.meta
    assert a.content_hash() == b.content_hash()


# ---- deduplication ---------------------------------------------------------------------------

def test_compute_pattern_has_exactly_one_program():
    t = synthetic.compute_pattern(8, 8, 100)
    assert len(t.prog_start) == 1
    assert list(t.prog_len) == [1]
    assert t.pe_program.shape == (8, 8, 1)
    assert np.all(t.pe_program == 0)
    op = t.program(0)[0]
    assert op.opcode == isa.OP_COMPUTE and op.kind == isa.KIND_FMAC and op.length == 100


def test_neighbor_pattern_has_one_program_per_distinct_send_and_receive():
    t = synthetic.neighbor(8, 8, 16, colors=2)
    # send on color 0, send on color 1, receive on color 0, receive on color 1
    assert len(t.prog_start) == 4
    assert int(np.count_nonzero(t.pe_program >= 0)) == 2 * 7 * 8
    progs = {tuple(t.program(p)) for p in range(len(t.prog_start))}
    assert len(progs) == 4  # all distinct
    t3 = synthetic.neighbor(8, 8, 16, colors=3)
    assert len(t3.prog_start) == 6


def test_builder_program_ids_are_shared_by_identical_programs():
    b = TraceBuilder(4, 4, 2)
    p1 = b.program([send(0, 4, 0), recv(1, 4, 16)])
    p2 = b.program((send(0, 4, 0), recv(1, 4, 16)))
    p3 = b.program([send(0, 4, 0)])
    assert p1 == p2 == 0
    assert p3 == 1
    b.assign(0, 0, 0, [send(0, 4, 0)])
    b.assign(3, 3, 1, [send(0, 4, 0), recv(1, 4, 16)])
    t = b.build()
    assert len(t.prog_start) == 2
    assert list(t.prog_start) == [0, 2]
    assert list(t.prog_len) == [2, 1]
    assert t.pe_program[0, 0, 0] == 1 and t.pe_program[3, 3, 1] == 0
    assert int(np.count_nonzero(t.pe_program >= 0)) == 2


def test_programs_pack_the_same_a_block_at_a_time(monkeypatch):
    progs = {tuple(send(j % 3, 1 + i, 8 * j) for j in range(1 + i % 4)): i for i in range(11)}  # 26 ops
    whole = T.pack_programs(progs)
    monkeypatch.setattr(T, "PACK_BLOCK_OPS", 3)  # blocks that end inside programs, and a last short one
    blocked = T.pack_programs(progs)
    assert all(np.array_equal(whole[0][k], blocked[0][k]) and whole[0][k].dtype == blocked[0][k].dtype
               for k in whole[0])
    assert np.array_equal(whole[1], blocked[1]) and np.array_equal(whole[2], blocked[2])
    assert len(whole[0]["opcode"]) == sum(len(p) for p in progs) == int(whole[2].sum())
    with pytest.raises(TraceError, match="op field length"):
        T.pack_programs({(send(0, 1 << 40, 0),): 0})


def test_programs_find_ops_by_object_and_by_content():
    """Programs keeps each distinct op once: a program of new objects equal to kept ones, of the
    kept objects themselves, or of a mix gets the same id, and the packed columns are every
    program's ops in id order, as an op-by-op stack of their fields would give."""
    rng = np.random.default_rng(5)
    pool = [T.Op(*(int(v) for v in rng.integers(0, 9, 11))) for _ in range(40)]
    progs = [[pool[i] for i in rng.integers(0, 40, 1 + int(rng.integers(0, 12)))] for _ in range(60)]
    table = T.Programs()
    ids = [table.add(ops) for ops in progs]
    fresh = [table.add([T.Op(*op) for op in ops]) for ops in progs]  # equal content, new objects
    mixed = [table.add([T.Op(*op) if k % 2 else op for k, op in enumerate(ops)]) for ops in progs]
    assert ids == fresh == mixed and len(table) == len({tuple(p) for p in progs})
    assert len(table.op_ids) == len({op for p in progs for op in p})
    cols, starts, lens = table.pack()
    first = {}
    for i, ops in zip(ids, progs):
        first.setdefault(i, ops)
    expect = np.array([op for i in sorted(first) for op in first[i]], dtype=np.int64)
    for k, (name, _) in enumerate(T.OP_COLUMNS):
        assert np.array_equal(cols[name], expect[:, k])
    assert list(lens) == [len(first[i]) for i in sorted(first)] and starts[0] == 0


def test_part_cache_tags_equal_ops_as_one_object():
    from wse.workload.region import PartCache
    cache = PartCache({"a": 3, "b": 4})
    out: dict = {}
    cache.add(out, "a", 1, lambda: {0: [send(0, 4, 0), send(0, 4, 0), recv(1, 4, 16)._replace(tag=9)]})
    cache.add(out, "a", 2, lambda: {0: [send(0, 4, 0)]})
    cache.add(out, "b", 1, lambda: {0: [send(0, 4, 0)]})
    a0, a1, kept, a2, b0 = out[0]
    assert a0 is a1 is a2 and a0 == send(0, 4, 0)._replace(tag=3)
    assert kept.tag == 9 and b0.tag == 4


@pytest.mark.parametrize("block", [7, 1000, 1 << 22])
def test_distinct_ops_a_block_at_a_time_equal_a_sort_of_all_rows(monkeypatch, block):
    from wse.hardware import load_preset
    from wse.workload.models import load_model
    from wse.workload.prefill import kernel_trace
    t, _ = kernel_trace(load_model("tiny-mla"), load_preset("wse3"), 16, 64, "q_kv_a", Q=24)
    monkeypatch.setattr(op_codes, "DISTINCT_BLOCK_OPS", block)
    idx = np.random.default_rng(3).permutation(len(t.ops["opcode"]))[:5000]
    for tag in (False, True):
        rows = np.stack([t.ops[n].astype(np.int64) for n, _ in T.OP_COLUMNS if tag or n != "tag"], axis=1)
        for ix in (None, idx):
            sel = rows if ix is None else rows[ix]
            _, first, inverse = np.unique(sel, axis=0, return_index=True, return_inverse=True)  # lexicographic
            reps, inv = op_codes.distinct_ops(t, ix, tag=tag)
            assert np.array_equal(reps, first if ix is None else ix[first])
            assert np.array_equal(inv, inverse.reshape(-1))


def test_builder_rejects_an_empty_program():
    with pytest.raises(ValueError):
        TraceBuilder(2, 2).program([])


def test_builder_grows_the_thread_axis():
    b = TraceBuilder(2, 2, 1)
    b.assign(1, 0, 3, [signal(0)])
    t = b.build()
    assert t.threads == 4
    assert t.pe_program.shape == (2, 2, 4)
    assert t.pe_program[0, 1, 3] == 0
    assert int(np.count_nonzero(t.pe_program >= 0)) == 1


def test_builder_keeps_meta_as_strings():
    t = TraceBuilder(2, 2, 1, pattern="x", wavelets=5).build()
    assert t.meta == {"pattern": "x", "wavelets": "5"}


# ---- save / load -----------------------------------------------------------------------------

PATTERN_ARGS = {
    "stream": (8, 8, 16, 7),
    "neighbor": (8, 8, 16, 2),
    "contention": (8, 8, 16, 5),
    "broadcast": (8, 8, 16, 7),
    "chain-reduce": (8, 8, 32, 7),
    "compute": (8, 8, 100),
}


@pytest.mark.parametrize("pattern", sorted(PATTERN_ARGS))
def test_save_load_round_trip(tmp_path, pattern):
    t = synthetic.PATTERNS[pattern](*PATTERN_ARGS[pattern])
    p = tmp_path / f"{pattern}.h5"
    t.save(p)
    back = T.load(p)
    _assert_same_trace(t, back)
    assert back.meta["pattern"] == pattern
    assert sorted(x.name for x in tmp_path.iterdir()) == [f"{pattern}.h5"]


def test_round_trip_of_hand_built_trace_with_every_op_kind(tmp_path, tiny):
    b = TraceBuilder(3, 2, 3, note='quote " and ünïcode')
    b.route(0, 0, 3, R, [E])
    b.route(1, 0, 3, W, [R, E])
    b.route(2, 0, 3, W, [R])
    b.assign(0, 0, 0, [send(3, 8, 0), signal(5)])
    b.assign(0, 0, 2, [wait(5), compute(isa.KIND_ADD, 8, 64, 0, 32, dtype=isa.DTYPE_FP32)])
    b.assign(1, 0, 0, [recv_compute(3, isa.KIND_FMAC, 8, dst=64, src0=0, dtype=isa.DTYPE_MIXED)])
    b.assign(2, 0, 1, [recv(3, 8, 128)])
    t = b.build()
    validate(t, tiny)
    p = tmp_path / "hand.h5"
    t.save(p)
    back = T.load(p)
    _assert_same_trace(t, back)
    assert back.meta == {"note": 'quote " and ünïcode'}
    assert back.program(int(back.pe_program[0, 0, 2])) == t.program(int(t.pe_program[0, 0, 2]))


def test_round_trip_of_trace_with_no_routes_and_no_programs(tmp_path):
    t = TraceBuilder(5, 3, 2).build()
    p = tmp_path / "empty.h5"
    t.save(p)
    back = T.load(p)
    _assert_same_trace(t, back)
    assert len(back.routes["pe"]) == 0 and len(back.ops["opcode"]) == 0


def test_content_hash_changes_with_any_array():
    a = synthetic.stream(8, 8, 16, 7)
    b = synthetic.stream(8, 8, 17, 7)
    c = synthetic.stream(8, 8, 16, 6)
    d = synthetic.stream(8, 4, 16, 7)
    hashes = {x.content_hash() for x in (a, b, c, d)}
    assert len(hashes) == 4
    assert a.content_hash() == synthetic.stream(8, 8, 16, 7).content_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", a.content_hash())


def test_save_overwrites_an_existing_file(tmp_path):
    p = tmp_path / "t.h5"
    synthetic.stream(8, 8, 16, 7).save(p)
    t2 = synthetic.compute_pattern(4, 4, 8)
    t2.save(p)
    _assert_same_trace(t2, T.load(p))
    assert [x.name for x in tmp_path.iterdir()] == ["t.h5"]


def test_saved_file_appears_only_when_complete(tmp_path, monkeypatch):
    p = tmp_path / "t.h5"
    seen = []
    real = h5py.Group.create_dataset

    def spy(self, name, *a, **kw):
        seen.append((p.exists(), [f.name for f in tmp_path.glob(".wse-*.partial")]))
        return real(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", spy)
    synthetic.neighbor(8, 8, 16).save(p)
    monkeypatch.undo()
    assert len(seen) == len(T.ROUTE_COLUMNS) + len(T.OP_COLUMNS) + 3 + 3  # + the /tags columns
    assert all(not final and len(tmp) == 1 for final, tmp in seen)  # written under a temporary name
    assert p.exists() and not list(tmp_path.glob(".wse-*"))
    T.load(p)


def test_failed_write_leaves_no_file_and_no_partial(tmp_path, monkeypatch):
    p = tmp_path / "t.h5"
    real = h5py.Group.create_dataset
    calls = []

    def failing(self, name, *a, **kw):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(TraceError) as e:
        synthetic.neighbor(8, 8, 16).save(p)
    assert str(p) in str(e.value)
    assert "disk full" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_save_into_missing_directory_raises_trace_error(tmp_path):
    p = tmp_path / "no" / "such" / "t.h5"
    with pytest.raises(TraceError) as e:
        synthetic.stream(8, 8, 16, 7).save(p)
    assert str(p) in str(e.value)
    assert not p.parent.exists()


# ---- validation ------------------------------------------------------------------------------

def _b(w: int = 8, h: int = 8, threads: int = 1) -> TraceBuilder:
    return TraceBuilder(w, h, threads)


def _valid_pair(b: TraceBuilder, color: int = 1) -> TraceBuilder:
    """(4, 5) sends north to (4, 4): a consistent send/receive pair."""
    b.route(4, 5, color, R, [N])
    b.route(4, 4, color, S, [R])
    b.assign(4, 5, 0, [send(color, 4, 0)])
    b.assign(4, 4, 0, [recv(color, 4, 0)])
    return b


def test_a_consistent_trace_validates(tiny):
    validate(_valid_pair(_b()).build(), tiny)
    for pattern, args in PATTERN_ARGS.items():
        validate(synthetic.PATTERNS[pattern](*args), tiny)


def _off_mesh_tx(b):
    b.route(6, 2, 0, R, [E])
    b.route(7, 2, 0, W, [E])
    b.assign(6, 2, 0, [send(0, 4, 0)])


def _off_mesh_rx(b):
    b.route(0, 3, 0, W, [R])
    b.assign(0, 3, 0, [recv(0, 4, 0)])


def _off_mesh_rx_north(b):
    b.route(5, 0, 2, N, [R])
    b.assign(5, 0, 0, [recv(2, 4, 0)])


def _color_out_of_range(b):
    b.route(2, 3, 30, R, [E])
    b.route(3, 3, 30, W, [R])


def _negative_color(b):
    b.route(2, 3, -1, R, [E])


def _duplicate_route(b):
    b.route(2, 3, 1, R, [E])
    b.route(3, 3, 1, W, [R])
    b.route(2, 3, 1, W, [R])
    b.route(1, 3, 1, R, [E])


def _sends_back_out_of_rx(b):
    b.route(2, 3, 1, W, [W, R])
    b.route(1, 3, 1, R, [E])


def _wavelets_lost(b):
    b.route(2, 3, 1, R, [E])
    b.assign(2, 3, 0, [send(1, 4, 0)])


def _wavelets_lost_wrong_rx(b):
    b.route(2, 3, 1, R, [E])
    b.route(3, 3, 1, N, [R])
    b.assign(2, 3, 0, [send(1, 4, 0)])


def _send_without_ramp_route(b):
    b.route(3, 4, 1, W, [R])  # there is a route for color 1, but not from the ramp
    b.route(2, 4, 1, R, [E])
    b.assign(3, 4, 0, [send(1, 4, 0)])


def _recv_without_ramp_route(b):
    b.route(3, 4, 2, R, [E])
    b.route(4, 4, 2, W, [E])
    b.route(5, 4, 2, W, [R])
    b.assign(3, 4, 0, [send(2, 4, 0)])
    b.assign(4, 4, 0, [recv(2, 4, 0)])  # color 2 passes (4, 4) without reaching its CE


def _sram_overflow(b):
    b.assign(4, 5, 0, [compute(isa.KIND_ADD, 30000, 0, 0, 0)])


def _sram_overflow_second_op(b):
    b.assign(1, 6, 0, [compute(isa.KIND_ADD, 4, 0, 0, 0),
                       compute(isa.KIND_MOV, 8, 49152 - 8, 0, dtype=isa.DTYPE_FP32)])


def _negative_address(b):
    b.assign(4, 5, 0, [compute(isa.KIND_MOV, 4, 0, -4)])


def _misaligned(b):
    b.assign(4, 5, 0, [compute(isa.KIND_ADD, 4, 0, 3, 0)])


def _misaligned_fp32(b):
    b.assign(2, 1, 0, [compute(isa.KIND_MUL, 4, 6, 0, 16, dtype=isa.DTYPE_FP32)])


def _more_signals(b):
    b.assign(4, 5, 0, [signal(2)])


def _more_waits(b):
    b.assign(4, 5, 0, [signal(3)])
    b.assign(4, 5, 1, [wait(3), wait(3)])


def _thread_beyond_wafer(b):
    b.assign(1, 2, 8, [compute(isa.KIND_ADD, 4, 0, 0, 0)])


def _max_mixed(b):
    b.assign(4, 5, 0, [compute(isa.KIND_MAX, 4, 0, 0, 0, dtype=isa.DTYPE_MIXED)])


def _add_mixed(b):
    b.assign(6, 7, 0, [compute(isa.KIND_ADD, 4, 0, 0, 0, dtype=isa.DTYPE_MIXED)])


def _send_color_out_of_range(b):
    b.assign(4, 5, 0, [send(40, 4, 0)])


def _zero_length(b):
    b.assign(4, 5, 0, [compute(isa.KIND_ADD, 0, 0, 0, 0)])


def _kind_none(b):
    b.assign(4, 5, 0, [compute(isa.KIND_NONE, 4, 0, 0, 0)])


def _semaphore_out_of_range(b):
    b.assign(4, 5, 0, [signal(16)])
    b.assign(4, 5, 1, [wait(16)])


VALIDATION_CASES = {
    "route off the mesh (tx)": (_off_mesh_tx, ["(7, 2)", "color 0", "sends east, off the mesh"]),
    "rx from off the mesh (west)": (_off_mesh_rx, ["(0, 3)", "color 0", "receives from west, off the mesh"]),
    "rx from off the mesh (north)": (_off_mesh_rx_north, ["(5, 0)", "receives from north, off the mesh"]),
    "color out of range": (_color_out_of_range, ["(2, 3)", "color 30", "out of range", "24 colors"]),
    "negative color": (_negative_color, ["(2, 3)", "color -1", "out of range"]),
    "duplicate route": (_duplicate_route, ["(2, 3)", "color 1", "more than one route"]),
    "route sends back out of rx": (_sends_back_out_of_rx, ["(2, 3)", "color 1", "back out of its rx port west"]),
    "wavelets lost": (_wavelets_lost, ["(2, 3)", "color 1", "PE (3, 3)",
                                       "receiving from west", "wavelets would be lost"]),
    "wavelets lost (wrong rx)": (_wavelets_lost_wrong_rx, ["(2, 3)", "PE (3, 3)", "wavelets would be lost"]),
    "send without rx=ramp route": (_send_without_ramp_route, ["(3, 4)", "sends on color 1", "rx = ramp"]),
    "recv without ramp-in-tx route": (_recv_without_ramp_route, ["(4, 4)", "receives on color 2",
                                                                 "ramp in tx"]),
    "SRAM beyond sram_bytes": (_sram_overflow, ["(4, 5)", "thread 0 op 0", "compute add", "[0, 60000)",
                                                "49152-byte SRAM"]),
    "SRAM beyond sram_bytes, second op": (_sram_overflow_second_op, ["(1, 6)", "thread 0 op 1", "compute mov",
                                                                     "[49144, 49176)"]),
    "negative address": (_negative_address, ["(4, 5)", "thread 0 op 0", "[-4, 4)"]),
    "misaligned operand": (_misaligned, ["(4, 5)", "thread 0 op 0", "at 3 is not aligned", "2-byte"]),
    "misaligned fp32 operand": (_misaligned_fp32, ["(2, 1)", "thread 0 op 0", "compute mul",
                                                   "at 6 is not aligned", "4-byte"]),
    "more signals than waits": (_more_signals, ["(4, 5)", "semaphore 2", "more signals than waits"]),
    "more waits than signals": (_more_waits, ["(4, 5)", "semaphore 3", "more waits than signals"]),
    "thread beyond microthreads": (_thread_beyond_wafer, ["(1, 2)", "thread 8", "8 microthreads"]),
    "max with dtype mixed": (_max_mixed, ["(4, 5)", "thread 0 op 0", "no max instruction for dtype mixed"]),
    "add with dtype mixed": (_add_mixed, ["(6, 7)", "thread 0 op 0", "no add instruction for dtype mixed"]),
    "send color out of range": (_send_color_out_of_range, ["(4, 5)", "thread 0 op 0 (send)",
                                                           "output color 40 out of range"]),
    "zero length": (_zero_length, ["(4, 5)", "thread 0 op 0", "length 0"]),
    "compute without kind": (_kind_none, ["(4, 5)", "thread 0 op 0", "compute op without a kind"]),
    "semaphore out of range": (_semaphore_out_of_range, ["(4, 5)", "semaphore 16 out of range"]),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_validation_error_names_the_pe(tiny, case):
    make, fragments = VALIDATION_CASES[case]
    b = _b(threads=2 if case != "thread beyond microthreads" else 9)
    make(b)
    t = b.build()
    with pytest.raises(TraceError) as e:
        validate(t, tiny, where="case.h5")
    msg = str(e.value)
    assert msg.startswith("case.h5: ")
    for f in fragments:
        assert f in msg, (f, msg)


def test_validation_cases_fail_only_for_their_fault(tiny):
    # The same builders with the fault removed validate: a send/recv pair and plain compute.
    b = _b(threads=2)
    _valid_pair(b)
    b.assign(6, 7, 0, [compute(isa.KIND_ADD, 4, 0, 0, 0, dtype=isa.DTYPE_FP16)])
    b.assign(2, 1, 0, [compute(isa.KIND_MUL, 4, 8, 0, 16, dtype=isa.DTYPE_FP32)])
    b.assign(1, 6, 0, [compute(isa.KIND_ADD, 4, 0, 0, 0),
                       compute(isa.KIND_MOV, 8, 49152 - 32, 0, dtype=isa.DTYPE_FP32)])
    b.assign(3, 3, 0, [signal(2)])
    b.assign(3, 3, 1, [wait(2)])
    b.assign(1, 2, 7, [compute(isa.KIND_ADD, 4, 0, 0, 0)])
    validate(b.build(), tiny)


def test_unused_thread_slots_beyond_the_wafer_are_allowed(tiny):
    b = _b(threads=12)
    b.assign(1, 2, 0, [compute(isa.KIND_ADD, 4, 0, 0, 0)])
    t = b.build()
    assert t.threads == 12
    validate(t, tiny)


@pytest.mark.parametrize("w, h", [(9, 8), (8, 9), (64, 64)])
def test_trace_mesh_larger_than_the_wafer(tiny, w, h):
    b = TraceBuilder(w, h)
    b.assign(0, 0, 0, [compute(isa.KIND_ADD, 4, 0, 0, 0)])
    with pytest.raises(TraceError) as e:
        validate(b.build(), tiny, where="big.h5")
    assert f"trace mesh {w}x{h} does not fit wafer tiny (8x8)" in str(e.value)
    assert str(e.value).startswith("big.h5: ")


def test_trace_smaller_than_the_wafer_validates(tiny):
    validate(synthetic.stream(4, 2, 8, 3), tiny)


def test_color_limit_follows_the_wafer(tiny):
    b = _b()
    _valid_pair(b, color=20)
    t = b.build()
    validate(t, tiny)
    small = tiny.with_overrides(["fabric.colors=16"])
    with pytest.raises(TraceError) as e:
        validate(t, small)
    assert "color 20" in str(e.value) and "16 colors" in str(e.value)


def test_sram_limit_follows_the_wafer(tiny):
    b = _b()
    b.assign(0, 0, 0, [compute(isa.KIND_MOV, 1024, 0, 2048)])  # touches [0, 4096)
    t = b.build()
    validate(t, tiny)
    with pytest.raises(TraceError) as e:
        validate(t, tiny.with_overrides(["sram.sram_bytes=4000", "sram.sram_reserved_bytes=0"]))
    assert "4000-byte SRAM" in str(e.value)


@pytest.mark.parametrize("with_routes", [False, True])
def test_trace_without_programs_validates(tiny, with_routes):
    b = _b()
    if with_routes:
        b.route(2, 2, 0, R, [E])
        b.route(3, 2, 0, W, [R])
    validate(b.build(), tiny)


# ---- file errors -----------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.h5"
    synthetic.stream(8, 8, 16, 7).save(p)
    return p


def _load_error(p) -> str:
    with pytest.raises(TraceError) as e:
        T.load(p)
    assert type(e.value) is TraceError
    msg = str(e.value)
    assert str(p) in msg
    assert "\n" not in msg
    return msg


def test_trace_error_is_a_wse_error_with_exit_code_2():
    assert issubclass(TraceError, WseError) and TraceError.exit_code == 2


def test_load_missing_file(tmp_path):
    assert "no such trace file" in _load_error(tmp_path / "missing.h5")


def test_load_empty_file(tmp_path):
    p = tmp_path / "empty.h5"
    p.write_bytes(b"")
    assert "trace file is empty" in _load_error(p)


def test_load_text_file(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("this is not an HDF5 file\n" * 20)
    assert "not a readable HDF5 trace file" in _load_error(p)


def test_load_directory(tmp_path):
    d = tmp_path / "dir.h5"
    d.mkdir()
    _load_error(d)


def test_load_truncated_file(tmp_path, good):
    data = good.read_bytes()
    p = tmp_path / "truncated.h5"
    p.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _load_error(p)


@pytest.mark.parametrize("fraction", [0.01, 0.25, 0.75, 0.95])
def test_load_other_truncations(tmp_path, good, fraction):
    data = good.read_bytes()
    p = tmp_path / "cut.h5"
    p.write_bytes(data[: int(len(data) * fraction)])
    _load_error(p)


def test_load_hdf5_signature_then_garbage(tmp_path):
    p = tmp_path / "garbage.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 16)
    _load_error(p)


def test_load_corrupted_blocks_never_raise_another_exception(tmp_path):
    path = tmp_path / "neighbor.h5"
    synthetic.neighbor(8, 8, 16).save(path)
    data = path.read_bytes()
    failures = 0
    for start in range(0, len(data), max(1, len(data) // 24)):
        d = bytearray(data)
        d[start:start + 1024] = b"\xab" * len(d[start:start + 1024])
        p = tmp_path / f"corrupt_{start}.h5"
        p.write_bytes(bytes(d))
        try:
            T.load(p)
        except TraceError as e:
            assert str(p) in str(e)
            failures += 1
    assert failures >= 10  # most blocks hold structure; damaging them must be reported


def test_load_hdf5_file_that_is_not_a_trace(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["data"] = np.arange(10)
    msg = _load_error(p)
    assert "not a wse trace file" in msg and "'format'" in msg


def test_load_wrong_format_version(tmp_path, good):
    p = tmp_path / "v9.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f.attrs["format_version"] = 9
    msg = _load_error(p)
    assert "format_version 9" in msg


def test_version_1_files_without_tags_still_load(tmp_path, good):
    p = tmp_path / "v1.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f.attrs["format_version"] = 1
        del f["ops/tag"]
        del f["tags"]
    t = T.load(p)
    assert (t.ops["tag"] == 0).all() and t.tags == [T.UNTAGGED]


def test_tags_round_trip_and_are_checked(tmp_path):
    b = TraceBuilder(2, 1)
    qkv = b.tag("layer 0 qkv", 0, "gemv")
    b.assign(0, 0, 0, [compute(isa.KIND_MOV, 8, 0, 64)._replace(tag=qkv)])
    p = tmp_path / "t.h5"
    b.build().save(p)
    t = T.load(p)
    assert t.tags[qkv] == T.Tag("layer 0 qkv", 0, "gemv") and t.ops["tag"][0] == qkv
    with h5py.File(p, "a") as f:
        f["ops/tag"][0] = 7
    assert "tag 7 is not in the /tags table" in _load_error(p)


@pytest.mark.parametrize("dataset", ["ops/opcode", "routes/tx", "programs/start", "pe_program"])
def test_load_trace_with_deleted_dataset(tmp_path, good, dataset):
    p = tmp_path / "deleted.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        del f[dataset]
    msg = _load_error(p)
    assert f"missing dataset /{dataset}" in msg


def test_load_trace_with_group_instead_of_dataset(tmp_path, good):
    p = tmp_path / "group.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        del f["pe_program"]
        f.create_group("pe_program")
    assert "/pe_program is not a dataset" in _load_error(p)


def test_load_trace_with_float_column(tmp_path, good):
    p = tmp_path / "float.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        n = len(f["ops/length"])
        del f["ops/length"]
        f["ops/length"] = np.full(n, 1.5)
    assert "/ops/length must be an integer array" in _load_error(p)


def test_load_trace_with_value_too_large_for_its_column(tmp_path, good):
    p = tmp_path / "wide.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        n = len(f["ops/opcode"])
        del f["ops/opcode"]
        f["ops/opcode"] = np.full(n, 1000, dtype=np.int32)
    assert "/ops/opcode has values that do not fit int8" in _load_error(p)


def test_load_trace_with_unknown_opcode(tmp_path, good):
    p = tmp_path / "opcode.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f["ops/opcode"][0] = 42
    msg = _load_error(p)
    assert "unknown opcode 42" in msg
    assert "PE (0, 0) thread 0 op 0" in msg


def test_load_trace_with_unknown_kind(tmp_path, good):
    p = tmp_path / "kind.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f["ops/kind"][1] = 42
    msg = _load_error(p)
    assert "unknown compute kind 42" in msg
    assert "PE (7, 0) thread 0 op 0" in msg


def test_load_trace_with_nonexistent_program(tmp_path, good):
    p = tmp_path / "prog.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f["pe_program"][3, 2, 0] = 9
    msg = _load_error(p)
    assert "PE (2, 3) thread 0: program id 9 does not exist" in msg


def test_load_trace_with_program_outside_op_table(tmp_path, good):
    p = tmp_path / "range.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f["programs/length"][1] = 50
    assert "program 1 refers to ops outside the op table" in _load_error(p)


def test_load_trace_with_columns_of_different_lengths(tmp_path, good):
    p = tmp_path / "cols.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        del f["routes/rx"]
        f["routes/rx"] = np.zeros(3, dtype=np.int8)
    assert "columns of one table have different lengths" in _load_error(p)


def test_load_trace_with_pe_program_of_wrong_shape(tmp_path, good):
    p = tmp_path / "shape.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f.attrs["mesh_width"] = 4
    assert "pe_program must have shape (8, 4, threads)" in _load_error(p)


def test_load_trace_with_route_pe_outside_mesh(tmp_path, good):
    p = tmp_path / "routepe.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f["routes/pe"][0] = 64
    assert "route 0: PE index 64 is outside the mesh" in _load_error(p)


def test_load_trace_with_bad_route_port(tmp_path, good):
    p = tmp_path / "port.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f["routes/rx"][0] = 7
    msg = _load_error(p)
    assert "PE (0, 0) color 0" in msg and "bad rx port 7" in msg


def test_load_trace_with_missing_mesh_attribute(tmp_path, good):
    p = tmp_path / "attr.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        del f.attrs["mesh_height"]
    assert "attribute mesh_height is missing" in _load_error(p)


def test_load_trace_with_bad_meta(tmp_path, good):
    p = tmp_path / "meta.h5"
    shutil.copy(good, p)
    with h5py.File(p, "a") as f:
        f.attrs["meta"] = "{not json"
    assert "'meta' is not JSON" in _load_error(p)


def test_fused_op_needs_an_instruction_for_its_dtype(tmp_path):
    from wse.trace import recv_compute
    tiny = hardware.load_preset("tiny")
    b = TraceBuilder(2, 1)
    b.route(0, 0, 0, isa.PORT_RAMP, [isa.PORT_EAST])
    b.route(1, 0, 0, isa.PORT_WEST, [isa.PORT_RAMP])
    b.assign(0, 0, 0, [send(0, 4, 0)])
    b.assign(1, 0, 0, [recv_compute(0, isa.KIND_MAX, 4, dst=0, src0=64, dtype=isa.DTYPE_MIXED)])
    with pytest.raises(TraceError, match=r"PE \(1, 0\) thread 0 op 0 .*no max instruction for dtype mixed"):
        validate(b.build(), tiny)


def test_builder_refuses_values_the_format_cannot_hold():
    b = TraceBuilder(2, 1)
    b.assign(0, 0, 0, [send(0, 3_000_000_000, 0)])
    with pytest.raises(TraceError, match="op field length = 3000000000 does not fit"):
        b.build()
    b = TraceBuilder(2, 1)
    b.route(0, 0, 200, isa.PORT_RAMP, [isa.PORT_EAST])
    with pytest.raises(TraceError, match="route field color = 200 does not fit"):
        b.build()


def test_op_columns_follow_the_op_fields():
    """pack_programs reads an op table in Op field order as the OP_COLUMNS columns."""
    from wse.trace import OP_COLUMNS, Op
    assert [name for name, _ in OP_COLUMNS] == list(Op._fields)
