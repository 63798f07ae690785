"""Field indices of the engine's packed state arrays (plain ints, shared by state and kernels).

Each PE's hot state sits in a few small contiguous records instead of dozens of separate
arrays: the kernel then keeps a handful of base pointers in registers and touches one or two
cache lines per record.
"""

# rt[p, slot, :] int8 - static route table, slots sorted by color
RT_RX = 0  # rx port
RT_TX = 1  # tx port mask
RT_UP = 2  # slot of the upstream route (link rx only), else -1
RT_DOWN = 3  # RT_DOWN + port: neighbour's slot for each link port in tx, else -1
RT_FIELDS = 8

# q[p, slot, :] int32 - the route's router queue and (tx has the ramp) its CE queue
Q_READY = 0
Q_OCC = 1
Q_PIPE = 2  # bit i: a wavelet in flight becomes ready after i more cycles
CQ_READY = 3
CQ_OCC = 4
CQ_PIPE = 5
Q_FIELDS = 8

# th[p, thread, :] int32 - microthread state, with the current op's constants copied in at
# op start so a cycle's work reads one record (no dependent load from the op table)
TH_OP = 0  # current op (global index into the op table)
TH_END = 1  # one past the program's last op
TH_LEFT = 2  # elements left in the current op
TH_SETUP = 3  # setup cycles left
TH_SUB = 4  # substep within the current step
TH_IN = 5  # route slot the current op receives from, else -1
TH_OUT = 6  # route slot the current op sends into, else -1
TH_CODE = 7  # opcode
TH_SEM = 8  # semaphore (signal / wait)
TH_NSUB = 9  # substeps per step
TH_RD_FIRST = 10  # read accesses in a non-last substep
TH_RD_LAST = 11  # read accesses in the last substep
TH_WR = 12  # write accesses in the last substep
TH_WIDTH = 13  # elements per step
TH_FIELDS = 16
# per-element counters of the current op stay in the op table (OT_FLOPS, OT_RBYTES, OT_WBYTES)

# pe[p, :] int32 - per-PE scalars
PE_ROUTES = 0  # number of routes
PE_RR = 1  # round-robin start slot
PE_LIVE = 2  # threads with ops left
PE_GRANT = 3  # bit k: slot k granted in this cycle's phase 1
PE_PEAK = 4  # largest queue occupancy seen
PE_FIELDS = 8

# ot[op, :] int64 - per-op constants for a configuration
OT_CODE = 0
OT_LENGTH = 1
OT_CIN = 2
OT_COUT = 3
OT_SEM = 4
OT_SETUP = 5  # setup cycles
OT_WIDTH = 6  # elements per step
OT_NSUB = 7  # substeps per step (1 or 2)
OT_RD_FIRST = 8  # read accesses in a non-last substep
OT_RD_LAST = 9  # read accesses in the last substep
OT_WR = 10  # write accesses in the last substep
OT_RBYTES = 11  # SRAM bytes read per element
OT_WBYTES = 12  # SRAM bytes written per element
OT_FLOPS = 13  # FLOPs per element
OT_RECV = 14  # 1: takes a wavelet per element
OT_SEND = 15  # 1: injects a wavelet per element
OT_FIELDS = 16
