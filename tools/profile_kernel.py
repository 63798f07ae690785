"""Where a stage simulation's kernel time goes, instruction by instruction.

    python tools/profile_kernel.py TRACE.h5 [--config wse3] [--top 12] [--threads 1]

Simulates the trace as a pool worker does (`engine.run.stage_options`), samples this process with
`perf record` meanwhile, and prints the hottest addresses of the compiled kernels with the
instructions leading to each (read from this process's memory, disassembled with objdump). Numba's
JIT code has no symbols for perf, so this is how the kernels' cache misses were found
(docs/performance.md, "Overlapping the misses"): a sample piles up on the instruction after a load
that misses; the load's offset and scale name the record field. Needs `perf` and `objdump`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--config", default="wse3")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    for tool in ("perf", "objdump"):
        if shutil.which(tool) is None:
            _fail(f"{tool} not found on PATH")
    import numba
    numba.set_num_threads(a.threads)
    from wse.engine.run import simulate, stage_options
    from wse.errors import WseError
    from wse.hardware import load_preset
    from wse.trace import load
    try:
        cfg, tr = load_preset(a.config), load(a.trace)
    except (WseError, OSError) as e:
        _fail(str(e) if a.trace in str(e) else f"{a.trace}: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-F", "1999", "-p", str(os.getpid()), "-o", data],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t0 = time.perf_counter()
        r = simulate(tr, cfg, threads=a.threads, validated=True, **stage_options(a.threads))
        wall = time.perf_counter() - t0
        perf.send_signal(signal.SIGINT)
        perf.wait()
        report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "-g", "none"],
                                capture_output=True, text=True).stdout
        print(f"{a.trace}: {tr.mesh_width}x{tr.mesh_height} PEs, {r.total_cycles:,} cycles, {wall:.2f} s")
        hot = [(float(m.group(1)), int(m.group(2), 16)) for m in
               (re.match(r"\s+([\d.]+)%\s+\[\.\]\s+0x([0-9a-f]+)", line) for line in report.splitlines()) if m]
        with open(f"/proc/{os.getpid()}/mem", "rb") as mem:
            for pct, addr in hot[:a.top]:
                mem.seek(addr - 64)
                code = os.path.join(tmp, "code.bin")
                with open(code, "wb") as f:
                    f.write(mem.read(80))
                asm = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64",
                                      f"--adjust-vma={addr - 64:#x}", code], capture_output=True, text=True).stdout
                lines = [ln for ln in asm.splitlines() if re.match(r"\s+[0-9a-f]+:\t[0-9a-f ]+\t\S", ln)]
                at = next((i for i, ln in enumerate(lines) if int(ln.split(":")[0], 16) == addr), len(lines) - 1)
                print(f"\n{pct:5.2f}%  {addr:#x}")
                for ln in lines[max(0, at - 4):at + 1]:
                    print("   " + re.sub(r"\t[0-9a-f ]+\t", "\t", ln, count=1))


if __name__ == "__main__":
    main()
