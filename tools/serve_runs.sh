#!/bin/sh
# The serving runs docs/serving.md quotes (each prints its table; run files in the current folder).
set -e
wse serve --model llama3.1-70b --system cs3x4 --wafers auto --gpu h100 --nodes 2 --rate 20 --duration 120 \
    --slo-ttft 0.5 --slo-tpot 0.02 -o serve70.h5
wse serve --model llama3.1-70b --system cs3x4 --wafers auto --gpu h100 --nodes 2 --rate 20 --duration 120 \
    --slo-ttft 0.5 --slo-tpot 0.02 --batch 8 -o serve70-b8.h5
wse serve --model llama3.1-8b --system cs3 --wafers auto --slot-shape square --rate 20 --duration 120 \
    --slo-ttft 0.5 --slo-tpot 0.02 --sensitivity -o serve8.h5
