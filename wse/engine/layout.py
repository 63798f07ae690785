"""Field indices of the engine's packed state arrays (plain ints, shared by state and kernels).

Each PE's hot state sits in a few small contiguous records instead of dozens of separate
arrays: the kernel then keeps a handful of base pointers in registers and touches one or two
cache lines per record. Route and queue records have 8 fields each and share a 64-byte slot
record ((slot << SLOT_SHIFT) + field, below; a PE's slot k is slot0[p] + k); thread records have 8 (base + (thread << 3)
+ field); PE records have 16 (base p << 4).
"""

# A route slot's static record (rt) and its queues (q) share one 64-byte record, rt's 8 fields
# then q's, so the fields either phase reads for a slot lie in one cache line; the kernels see
# rt as the flat records and q as the same buffer 8 fields on, both indexed (slot << SLOT_SHIFT).
SLOT_FIELDS = 16
SLOT_SHIFT = 4
MASK32 = 0xFFFFFFFF  # route-slot masks are stored in int32 fields (at most 32 slots)

# rt[slot, :] int32 - static route table, a PE's slots sorted by color
RT_RX = 0  # rx port
RT_TX = 1  # tx port mask
RT_INC = 4  # sum over tx ports of 1 << (4 * port): the route's use of per-port capacity
RT_DOWNQ = 5  # one link port in tx: flat q index of the neighbour's record (its slot << SLOT_SHIFT);
#              none: -1; more: -2
RT_DOWNS = 6  # byte `port` holds 1 + the neighbour's slot among its routes for each link port in tx (0: none)
RT_CROSS = 7  # link ports in tx whose neighbour lies in another tile (set with the tiles)
RT_FIELDS = 8

# q[slot, :] int32 - the route's router queue and (tx has the ramp) its CE queue
Q_READY = 0
Q_OCC = 1
Q_PIPE = 2  # bit i: a wavelet in flight becomes ready after i more cycles
CQ_READY = 3
CQ_OCC = 4
CQ_PIPE = 5
Q_GRANTS = 6  # times granted since the last full fold (then added to the link wavelet counters)
Q_FIELDS = 8

# th[p, thread, :] int32 - microthread state; the current op's constants are copied in at op
# start so a cycle's work reads one 32-byte record and nothing from the op table
TH_OP = 0  # current op (global index into the op table)
TH_END = 1  # one past the program's last op
TH_LEFT = 2  # elements left in the current op
TH_SETUP = 3  # setup cycles left
TH_CTRL = 4  # packed: opcode | sub << 4 | two substeps << 5 | reads first << 6 | reads last << 8
#              | writes << 10 | semaphore << 12
TH_WIDTH = 5  # elements per step
TH_IN = 6  # route slot the current op receives from, else -1
TH_OUT = 7  # route slot the current op sends into, else -1
TH_FIELDS = 8
CTRL_CODE = 15  # opcode mask; CODE_DONE marks a finished or idle thread
CODE_DONE = 15
CTRL_SUB = 1 << 4
CTRL_TWO = 1 << 5

# pe[p, :] int32 - per-PE scalars
PE_ROUTES = 0  # bits 0-7: number of routes; bits 8-15: the PE's thread span (1 + its highest thread
#               with a program: the CE step visits threads 0 .. span-1 only)
ROUTES_MASK = 255
SPAN_SHIFT = 8
PE_RR = 1  # round-robin start slot
PE_LIVE = 2  # threads with ops left
PE_GRANT = 3  # bit k: slot k granted in this cycle's phase 1
PE_PEAK = 4  # largest queue occupancy seen
PE_TRACE = 5  # slot in the event log when this PE's op timeline is recorded, else -1
PE_SLEEP_CLASS = 6  # cycle class counted while the CE sleeps (see kernels: exact skipping)
PE_READY = 7  # bit k: slot k's router queue holds a ready wavelet
PE_PIPES = 8  # bit k: slot k has a wavelet in flight towards its router or CE queue
PE_HELD = 9  # wavelets held in the PE's queues (ready or in flight)
PE_SLEEP_THREAD = 10  # the thread a CE asleep in C_BUSY is computing with (exact skipping)
PE_CE_RR = 11  # the thread the CE step starts at: after the first that took a step last time one did
PE_ARRIVE = 12  # 12 + port: bit k, a wavelet travelling through `port` enters slot k this cycle
#                 (written in phase 1 by the neighbour it comes from, cleared in phase 2)
PE_FIELDS = 16

# ot[omap[op], :] int64 - per-op constants for a configuration, one row per distinct op and tag
OT_CODE = 0
OT_LENGTH = 1  # elements
OT_CIN = 2  # color received from, else -1
OT_COUT = 3  # color sent on, else -1
OT_SETUP = 4  # setup cycles
OT_WIDTH = 5  # elements per step
OT_CTRL = 6  # the packed TH_CTRL word of the op (substep 0)
OT_RBYTES = 7  # SRAM bytes read per element
OT_WBYTES = 8  # SRAM bytes written per element
OT_FLOPS = 9  # FLOPs per element
OT_RECV = 10  # 1: takes a wavelet per element
OT_SEND = 11  # 1: injects a wavelet per element
OT_TAG = 12  # workload-level op (trace tag)
OT_FIELDS = 16


def ctrl_word(code: int, two_substeps: bool, reads_first: int, reads_last: int, writes: int,
              sem: int) -> int:
    """The packed TH_CTRL word (see TH_CTRL)."""
    return (code | (CTRL_TWO if two_substeps else 0) | reads_first << 6 | reads_last << 8
            | writes << 10 | sem << 12)


# acc[:, p] int64 - per-op counters, in the order of isa.PE_COUNTERS from C_FLOPS
A_FLOPS = 0
A_SRAM_READ = 1
A_SRAM_WRITE = 2
A_SENT = 3
A_RECEIVED = 4
A_OPS = 5


# Instrumentation (Ins): per-block, per-tag statistics, fields of one [block, tag] record
TS_FIRST = 0  # earliest start cycle of an op with this tag
TS_LAST = 1  # latest end cycle
TS_OPS = 2  # ops completed
TS_FLOPS = 3
TS_BYTES = 4  # SRAM bytes read and written
TS_WAVELETS = 5  # wavelets sent and received by the CE
TS_FIELDS = 6
EVENT_FIELDS = 4  # op, thread, start cycle, end cycle


# tile state [tile, :] int64 - activity of a rectangle of PEs (kernels: exact skipping by tile).
# Whether a tile is due this cycle is kept apart (Tiles.due, Tiles.need1, Tiles.kick): the
# stepping loops check every tile every cycle, and those compact arrays stay in the cache.
TL_PENDING = 0  # wavelets held + live threads, as of the tile's last phase 2
TL_PROGRESSED = 1  # sleeping CEs in busy or setup (each progresses every cycle), likewise
TL_WAKE = 2  # earliest wake-up of a sleeping CE, likewise
TL_HELD = 3  # wavelets held in the tile's queues, as of the last fold
TL_FLOPS = 4  # FLOPs done (completed ops and finished elements of ops in progress), as of the last fold
TL_DIRTY = 5  # 1: stepped since the last fold
TL_FIELDS = 8  # (one 64-byte record a tile)
