#!/usr/bin/env bash
# Cold and warm wall times of `wse system` and the README's 8B sweep (docs/scale-out.md, "Measured").
# Each cold run starts from an empty stage cache of its own; the warm run repeats it on that cache.
#   tools/scale_out_times.sh [OUT_DIR]        (default: scale-out-times/; JOBS overrides --jobs)
set -u
out=${1:-scale-out-times}
jobs=${JOBS:-0}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
times="$out/walltimes.txt"
run() {  # name, then the wse arguments (-o is added)
  local name=$1; shift
  rm -rf "$out/cache-$name"
  for pass in cold warm; do
    WSE_CACHE="$out/cache-$name" /usr/bin/time -f "$name $pass: %e s wall, %M KB peak" -a -o "$times" \
      wse "$@" --jobs "$jobs" -o "$out/$name-$pass.h5" > "$out/$name-$pass.txt" 2>&1 \
      || echo "$name $pass: failed (see $out/$name-$pass.txt)" | tee -a "$times"
  done
}
run 8b system --model llama3.1-8b --system cs3 --prompt-len 0
run 70b system --model llama3.1-70b --system cs3x4 --wafers auto --prompt-len 0
run dsv3 system --model deepseek-v3 --system cs3x4 --wafers auto --uniform-slots --prompt-len 0
run sweep8b sweep "$root/traces/sweeps/llama3.1-8b.toml"
echo "on $(nproc) cores ($(uname -m)), --jobs $jobs" | tee -a "$times"
cat "$times"
