#!/usr/bin/env bash
# The large `wse system` runs quoted in docs/system.md, one after another:
#   OUT=runs JOBS=16 tools/system_runs.sh kimi-k2:fp8 deepseek-v3:bf16 deepseek-v3:fp8:512
# Each RUN is MODEL:WEIGHTS[:PROMPT] (PROMPT 0 or absent: no TTFT) on cs3x64 with --wafers auto
# and --uniform-slots. Per run: OUT/NAME.txt (the table, wafers, depth, region breakdown),
# OUT/NAME.report.txt (`wse report`), OUT/NAME.err (progress: a line a minute); wall times in
# OUT/walltimes.txt. The run files are large (they hold the largest stage's counters): they go
# to H5 (default OUT).
set -euo pipefail
out=${OUT:-runs}
h5=${H5:-$out}
jobs=${JOBS:-$(nproc)}
py=${PYTHON:-python3}
mkdir -p "$out" "$h5"
for run in "$@"; do
  IFS=: read -r model weights prompt <<< "$run"
  prompt=${prompt:-0}
  name="${model}_${weights}$([ "$prompt" != 0 ] && echo "_p$prompt" || true)"
  start=$(date +%s)
  PYTHONUNBUFFERED=1 "$py" -m wse.cli system --model "$model" --system cs3x64 --wafers auto --weights "$weights" \
    --uniform-slots --jobs "$jobs" --log-progress 60 --prompt-len "$prompt" -o "$h5/$name.h5" > "$out/$name.txt" 2> "$out/$name.err"
  wall=$(( $(date +%s) - start ))
  "$py" -m wse.cli report "$h5/$name.h5" > "$out/$name.report.txt"
  echo "$name: ${wall} s wall, --jobs $jobs on $(nproc) cores ($(uname -m))" | tee -a "$out/walltimes.txt"
done
