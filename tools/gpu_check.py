"""The GPU baseline against published serving measurements (docs/gpu-baseline.md, "Checked
against published measurements"): for each case the model's time per output token at the
measured concurrency and mean context, beside the published figure, and the error.

    python tools/gpu_check.py

Sources: ../shared/reference/gpu.md (sections 3 and 4). Every case runs the model on the
hardware, parallelism and weight precision the measurement used; contexts are the mean over a
generation (input + half the output).
"""
from __future__ import annotations

from wse.system.gpu import Weights, gpu_decode, load_gpu
from wse.system.gpu_parallel import with_tp
from wse.workload.models import load_model

FP8 = Weights(1.0, 1.0, True)
MXFP4 = None  # the model's stored dtypes (gpt-oss: MXFP4 experts)

# (label, model, gpu, tp, weights, concurrency, mean context, published TPOT s, source)
CASES = (
    ("Llama 3.3 70B, 2xH100 TP2 fp8, NIM, 5000/500, conc 1", "llama3.1-70b", "h100", 2, FP8, 1, 5250, 18.58e-3,
     "NIM 1.8.0 benchmarks [P]"),
    ("Llama 3.3 70B, 2xH100 TP2 fp8, NIM, 500/2000, conc 1", "llama3.1-70b", "h100", 2, FP8, 1, 1500, 18.91e-3,
     "NIM 1.8.0 benchmarks [P]"),
    ("Llama 3.3 70B, 2xH100 TP2 fp8, NIM, 5000/500, conc 100", "llama3.1-70b", "h100", 2, FP8, 100, 5250, 92.9e-3,
     "NIM 1.8.0 benchmarks [P]"),
    ("gpt-oss-120b, 8xB200 TP8 mxfp4, SGLang, ShareGPT, conc 1", "gpt-oss-120b", "b200", 8, MXFP4, 1, 1000, 2.31e-3,
     "sglang cookbook [P]"),
    ("gpt-oss-120b, 8xB200 TP8 mxfp4, SGLang, ShareGPT, conc 100", "gpt-oss-120b", "b200", 8, MXFP4, 100, 1000,
     14.3e-3, "sglang cookbook [P]"),
    ("DeepSeek-R1, 8xB200 TP8 fp8, SGLang, 1K/1K, conc 1", "deepseek-v3", "b200", 8, FP8, 1, 1500, 9.16e-3,
     "sglang cookbook [P]"),
    ("DeepSeek-R1, 8xB200 TP8 fp8, SGLang, 1K/1K, conc 16", "deepseek-v3", "b200", 8, FP8, 16, 1500, 17.6e-3,
     "sglang cookbook [P]"),
    ("DeepSeek-R1, 8xB200 TP8 fp8, SGLang, 1K/1K, conc 100", "deepseek-v3", "b200", 8, FP8, 100, 1500, 40.1e-3,
     "sglang cookbook [P]"),
    ("Kimi K2, 8xB200 TP8 fp8, SGLang, ShareGPT, conc 1", "kimi-k2", "b200", 8, FP8, 1, 1000, 15.76e-3,
     "sglang cookbook [P]"),
    ("Kimi K2, 8xB200 TP8 fp8, SGLang, ShareGPT, conc 100", "kimi-k2", "b200", 8, FP8, 100, 1000, 85.6e-3,
     "sglang cookbook [P]"),
)


def rows():
    for label, model, gpu, tp, w, conc, ctx, published, src in CASES:
        spec = load_model(model)
        r = gpu_decode(spec, with_tp(load_gpu(gpu), tp), batch=conc, context=ctx, weight_bytes=w, nodes=1,
                       check_fit=False)  # (served with paged, partly filled caches)
        yield label, r.step_latency_s, published, r.step_latency_s / published - 1, r.bound, src


def main() -> None:
    print(f"{'case':64} {'model TPOT':>11} {'published':>10} {'error':>7}  bound")
    errs = []
    for label, model_s, pub, err, bound, _ in rows():
        errs.append(abs(err))
        print(f"{label:64} {model_s * 1e3:9.2f}ms {pub * 1e3:8.2f}ms {err:+7.0%}  {bound}")
    print(f"mean |error| {sum(errs) / len(errs):.0%}, largest {max(errs):.0%}")


if __name__ == "__main__":
    main()
