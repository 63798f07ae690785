"""The trace instruction set: opcodes, compute kinds, dtypes and router ports as small ints.

Everything here is a plain integer constant or a tuple of them, so that Numba kernels can use
the values as compile-time constants and traces can store them in compact integer columns.
docs/trace-format.md is the normative description; keep the two in step.
"""
from __future__ import annotations

# --- router ports -------------------------------------------------------------------------
# A route's rx is one port; its tx is a bit mask over ports (bit p = 1 << p).
PORT_NORTH = 0  # towards y - 1
PORT_SOUTH = 1  # towards y + 1
PORT_EAST = 2  # towards x + 1
PORT_WEST = 3  # towards x - 1
PORT_RAMP = 4  # the PE's own compute engine (CE)
N_LINK_PORTS = 4
N_PORTS = 5
PORT_NAMES = ("north", "south", "east", "west", "ramp")
PORT_DX = (0, 0, 1, -1, 0)
PORT_DY = (-1, 1, 0, 0, 0)
# The port on the neighbour through which a wavelet sent out of port p arrives.
PORT_OPPOSITE = (PORT_SOUTH, PORT_NORTH, PORT_WEST, PORT_EAST, PORT_RAMP)

# --- opcodes --------------------------------------------------------------------------------
OP_COMPUTE = 0  # vector op over local SRAM: dst <- kind(src0, src1 / dst)
OP_SEND = 1  # SRAM src0 -> wavelets on color_out
OP_RECV = 2  # wavelets on color_in -> SRAM dst
OP_RECV_COMPUTE = 3  # dst <- kind(wavelet, SRAM operand); one element per wavelet
OP_RECV_COMPUTE_SEND = 4  # wavelet_out <- kind(wavelet_in, SRAM src0); forwards on color_out
OP_SIGNAL = 5  # semaphore sem += 1
OP_WAIT = 6  # block until semaphore sem > 0, then sem -= 1
N_OPCODES = 7
OPCODE_NAMES = ("compute", "send", "recv", "recv_compute", "recv_compute_send", "signal", "wait")

# --- compute kinds ------------------------------------------------------------------------------
# Per kind: SRAM vector sources read per element (for FMAC the accumulator dst is one of them),
# whether dst is written, and FLOPs per element.
KIND_NONE = 0  # used by non-compute ops
KIND_FMAC = 1  # dst = dst + src0 * scalar
KIND_ADD = 2  # dst = src0 + src1
KIND_MUL = 3  # dst = src0 * src1
KIND_MAX = 4  # dst = max(src0, src1)
KIND_MOV = 5  # dst = src0
KIND_SCALE = 6  # dst = src0 * scalar
# Reductions and elementwise functions (compute ops only; docs/model.md, "Values"):
KIND_DOT = 7  # dst[0] = dst[0] + sum(src0 * src1): a stride-0 accumulator, rewritten every element
KIND_EXP = 8  # dst = exp(src0 - scalar)
KIND_RSQRT = 9  # dst = 1 / sqrt(src0 + scalar)
KIND_RECIP = 10  # dst = 1 / src0
KIND_SILU = 11  # dst = src0 / (1 + exp(-src0))
KIND_RMAX = 12  # dst[0] = max(dst[0], max(src0)): a stride-0 accumulator, like DOT
KIND_RSUM = 13  # dst[0] = dst[0] + sum(src0): a stride-0 accumulator, like DOT
KIND_SUB = 14  # dst = src0 - src1
KIND_RFIND = 15  # dst[0] = max(dst[0], -e) for each element e with src0[e] == scalar: -(the first match's index)
KIND_FILL = 16  # dst = scalar: no SRAM source (clearing an accumulator)
N_KINDS = 17
KIND_NAMES = ("none", "fmac", "add", "mul", "max", "mov", "scale", "dot", "exp", "rsqrt", "recip", "silu", "rmax",
              "rsum", "sub", "rfind", "fill")
KIND_SOURCES = (0, 2, 2, 2, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 0)
# Passes over the vector per element [U]: the CE has no instruction for these functions, so they
# are FMAC-like passes (range reduction and a polynomial; Newton steps); each pass reads the
# source stream and writes dst, and does 2 FLOPs per element.
KIND_PASSES = (1, 1, 1, 1, 1, 1, 1, 1, 5, 3, 3, 6, 1, 1, 1, 1, 1)
KIND_FLOPS = (0, 2, 1, 1, 1, 0, 1, 2, 10, 6, 6, 12, 1, 1, 1, 1, 0)  # per element, all passes
KIND_REDUCES = (KIND_DOT, KIND_RMAX, KIND_RSUM, KIND_RFIND)  # kinds whose dst is one element (a stride-0 accumulator)
KIND_SCALAR = (KIND_FMAC, KIND_SCALE, KIND_EXP, KIND_RSQRT, KIND_RFIND, KIND_FILL)  # kinds reading a scalar at src1
FIRST_COMPUTE_ONLY_KIND = KIND_DOT  # kinds from here on are not fused into receive ops

# --- dtypes ---------------------------------------------------------------------------------
DTYPE_FP16 = 0
DTYPE_FP32 = 1
DTYPE_MIXED = 2  # fp16 sources, fp32 destination / accumulator (the SDK's @fmachs)
# Low-precision weights, dequantized to fp16 by a SCALE op (decode each value, times a scale):
DTYPE_FP8 = 3  # one 8-bit float (E4M3) per source byte
DTYPE_INT8 = 4  # one 8-bit integer per source byte
DTYPE_INT4 = 5  # a pair of 4-bit integers per source byte: one element is the pair (two fp16 out)
N_DTYPES = 6
DTYPE_NAMES = ("fp16", "fp32", "mixed", "fp8", "int8", "int4")
DTYPE_SRC_BYTES = (2, 4, 2, 1, 1, 1)
DTYPE_DST_BYTES = (2, 4, 4, 2, 2, 4)
DTYPE_VALUES = (1, 1, 1, 1, 1, 2)  # values per element: an op's FLOPs per element are the kind's times these

# Bytes carried by one wavelet: a 32-bit payload. One element travels per wavelet.
WAVELET_PAYLOAD_BYTES = 4

# Per-PE semaphores available to SIGNAL / WAIT.
MAX_SEMAPHORES = 16
NO_COLOR = -1

# --- per-PE counters (columns of the engine's pe counter array) -----------------------------
PE_COUNTERS = (
    ("busy_cycles", "cycles", "cycles in which at least one op moved data or completed a sync op"),
    ("setup_cycles", "cycles", "cycles spent only in op setup"),
    ("stall_sram_cycles", "cycles", "cycles in which runnable ops waited only for SRAM ports"),
    ("stall_recv_cycles", "cycles", "cycles in which ops waited for input wavelets"),
    ("stall_send_cycles", "cycles", "cycles in which ops waited for output queue room"),
    ("stall_sync_cycles", "cycles", "cycles in which threads waited on a semaphore"),
    ("flops", "flop", "floating-point operations executed"),
    ("sram_read_bytes", "bytes", "bytes read from local SRAM"),
    ("sram_write_bytes", "bytes", "bytes written to local SRAM"),
    ("wavelets_sent", "wavelets", "wavelets injected into the router by the CE"),
    ("wavelets_received", "wavelets", "wavelets consumed by the CE"),
    ("ops_completed", "ops", "ops completed by all threads"),
    ("finish_cycle", "cycle", "cycle after the PE's last op completed (0: no ops)"),
    ("peak_queue_wavelets", "wavelets", "largest occupancy of any queue (router or CE) at this PE"),
)
PE_COUNTER_NAMES = tuple(c[0] for c in PE_COUNTERS)
(
    C_BUSY,
    C_SETUP,
    C_STALL_SRAM,
    C_STALL_RECV,
    C_STALL_SEND,
    C_STALL_SYNC,
    C_FLOPS,
    C_SRAM_READ,
    C_SRAM_WRITE,
    C_SENT,
    C_RECEIVED,
    C_OPS,
    C_FINISH,
    C_PEAK_QUEUE,
) = range(len(PE_COUNTERS))
N_PE_COUNTERS = len(PE_COUNTERS)

# --- per-link counters (per PE and outgoing link port N, S, E, W) ---------------------------
LINK_COUNTERS = (
    ("wavelets", "wavelets", "wavelets carried out of this PE through this port"),
    ("blocked_cycles", "cycles",
     "cycles with a ready wavelet for this link while it carried less than its capacity"),
    ("contention_cycles", "cycles",
     "cycles in which the link ran at capacity and further ready wavelets had to wait"),
)
LINK_COUNTER_NAMES = tuple(c[0] for c in LINK_COUNTERS)
L_WAVELETS, L_BLOCKED, L_CONTENTION = range(len(LINK_COUNTERS))
N_LINK_COUNTERS = len(LINK_COUNTERS)

# Stop reasons reported by the engine.
STOP_COMPLETE = 0
STOP_DEADLOCK = 1
STOP_MAX_CYCLES = 2
STOP_INTERRUPTED = 3  # Ctrl-C
STOP_RUNNING = 4  # a placeholder or snapshot written while the run goes on
STOP_NAMES = ("complete", "deadlock", "max_cycles", "interrupted", "running")


def tx_mask(*ports: int) -> int:
    """Bit mask of the given ports, for a route's tx set."""
    m = 0
    for p in ports:
        m |= 1 << p
    return m


def ports_of(mask: int) -> list[int]:
    """Ports named in a tx mask, in port order."""
    return [p for p in range(N_PORTS) if mask >> p & 1]


def op_streams(opcode: int, kind: int, dtype: int, dst: int, src0: int, src1: int
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """SRAM streams an op touches: ([(addr, bytes_per_element) read], [... written]).

    A compute kind reads its sources in a fixed order (FMAC: accumulator dst, then src0;
    ADD/MUL/MAX: src0, src1; MOV/SCALE: src0; FILL: none). A fused receive op takes the wavelet in place
    of the last source; RECV_COMPUTE writes dst, RECV_COMPUTE_SEND sends instead of writing.
    """
    sb, db = DTYPE_SRC_BYTES[dtype], DTYPE_DST_BYTES[dtype]
    if opcode == OP_SEND:
        return [(src0, sb)], []
    if opcode == OP_RECV:
        return [], [(dst, db)]
    if opcode in (OP_SIGNAL, OP_WAIT):
        return [], []
    if kind == KIND_FMAC:
        sources = [(dst, db), (src0, sb)]
    elif KIND_SOURCES[kind] == 2:
        sources = [(src0, sb), (src1, sb)]
    elif kind == KIND_FILL:
        sources = []
    else:
        sources = [(src0, sb)]
    if opcode == OP_COMPUTE:
        return sources, [(dst, db)]
    reads = sources[: len(sources) - 1]
    return reads, ([(dst, db)] if opcode == OP_RECV_COMPUTE else [])
