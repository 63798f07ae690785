#!/usr/bin/env bash
# The decode-rate and long-context runs quoted in docs/workloads.md, one after another:
#   OUT=runs JOBS=16 tools/decode_rates.sh llama3.1-8b:4096 llama3.1-70b:32768 wse2/llama3.1-8b:4096 \
#     llama3.1-8b:8192:--generate=1024 llama3.1-8b:4096:--attention=classic:--norms=separate
# RUN is [wse2/]MODEL:CONTEXT[:EXTRA...]: `wse system` on cs3x64 with --wafers auto, --uniform-slots
# and no prompt; with the wse2/ prefix the whole model on one WSE-2 on 360x360 layer slots
# (`wse run`, as the published WSE-2 decode measurements place it; a WSE-2 holds four such slots,
# so give these --layers=1). EXTRA options are written
# with '=' for the space. Per run: OUT/NAME.txt (the printed summary), OUT/NAME.parts.txt (cycles
# of the layer's parts in the representative stage, tools/layer_parts.py), OUT/NAME.err; wall
# times in OUT/walltimes.txt; run files in H5 (default OUT).
set -euo pipefail
out=${OUT:-runs}
h5=${H5:-$out}
jobs=${JOBS:-$(nproc)}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" "$h5"
for run in "$@"; do
  IFS=: read -r -a f <<< "$run"
  target=${f[0]}
  context=${f[1]}
  extra=()
  for x in "${f[@]:2}"; do extra+=("${x/=/ }"); done
  extra=(${extra[@]+${extra[@]}})
  name="$(echo "$target" | tr / _)_${context}$(printf '%s' "${f[@]:2}" | tr -c 'a-z0-9' '_')"
  start=$(date +%s)
  status=0
  if [[ $target == wse2/* ]]; then
    PYTHONUNBUFFERED=1 "$py" -m wse.cli run --model "${target#wse2/}" --wafer wse2 --region 360x360 \
      --context "$context" ${extra[@]+"${extra[@]}"} -o "$h5/$name.h5" > "$out/$name.txt" 2> "$out/$name.err" \
      || status=$?
  else
    PYTHONUNBUFFERED=1 "$py" -m wse.cli system --model "$target" --system cs3x64 --wafers auto --uniform-slots \
      --prompt-len 0 --context "$context" --jobs "$jobs" --log-progress 60 ${extra[@]+"${extra[@]}"} -o "$h5/$name.h5" \
      > "$out/$name.txt" 2> "$out/$name.err" || status=$?
  fi
  wall=$(( $(date +%s) - start ))
  if [[ $status != 0 ]]; then  # (a run that fails, e.g. a model that does not place, does not stop the rest)
    echo "$name: failed (exit $status): $(tail -n 1 "$out/$name.err")" | tee -a "$out/walltimes.txt"
    continue
  fi
  "$py" "$here/layer_parts.py" "$h5/$name.h5" > "$out/$name.parts.txt" || true
  echo "$name: ${wall} s wall, --jobs $jobs on $(nproc) cores ($(uname -m))" | tee -a "$out/walltimes.txt"
done
