"""GPTQ speed on the ERNIE-4.5-0.3B linear shapes, next to RTN and a plain float64 matmul, in one run.

    .venv/bin/python scripts/bench/gptq.py [--rounds 3] [--tokens 4096] [--group-size 128] [--layers 2]

For each weight shape [out, in] of a 0.3B decoder layer (qkv_proj [2560, 1024], o_proj [1024, 2048],
up_gate_proj [6144, 1024], down_proj [1024, 3072], and the [3072, 1024] of the brief) it times, median of
--rounds: RTN (`rtn_quantize`) and GPTQ (`gptq_quantize`, wint4 groups of --group-size, damp 0.01, block 128)
on a Hessian from --tokens correlated random rows. GPTQ's floating-point work is about
out*in^2 (lazy batch updates) + out*in*128 (in-block updates) + (1/3 + 2)*in^3 (Cholesky, triangular inverse
by LU), all float64 multiply-adds counted as 2 flops; its rate is reported against a 2048^3 float64 numpy
matmul timed in the same run (the practical limit of this machine). With --layers N it also runs the whole
layer-by-layer driver, `gptq_model`, on an N-layer model of 0.3B widths (vocab 4096, random weights) over
8 sequences of 512 tokens and reports seconds per decoder layer.
"""
import argparse
import json
import statistics
import time

import numpy as np

import libernie  # noqa: F401  (thread defaults before paddle/numpy BLAS start)
from libernie.quant.gptq import HessianAccumulator, gptq_quantize, rtn_quantize

SHAPES = {"qkv_proj": (2560, 1024), "o_proj": (1024, 2048), "up_gate_proj": (6144, 1024),
          "down_proj": (1024, 3072), "brief [3072,1024]": (3072, 1024)}


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hessian(n_in: int, tokens: int, rng) -> np.ndarray:
    mix = rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)
    acc = HessianAccumulator(n_in)
    for a in range(0, tokens, 1024):
        acc.add(rng.normal(size=(min(1024, tokens - a), n_in)) @ mix)
    return acc.H


def bench_driver(layers: int) -> float:
    import paddle
    from libernie.config import ErnieConfig
    from libernie.model import ErnieForCausalLM
    from libernie.quant.gptq_model import gptq_model

    paddle.seed(0)
    model = ErnieForCausalLM(ErnieConfig(vocab_size=4096, num_hidden_layers=layers))
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 4096, size=(2, 512))} for _ in range(4)]
    t = time.perf_counter()
    gptq_model(model, batches, bits=4, group_size=128)
    return (time.perf_counter() - t) / layers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2048, 2048)), rng.normal(size=(2048, 2048))
    a @ b
    matmul = 2 * 2048 ** 3 / median_time(lambda: a @ b, args.rounds) / 1e9
    print(f"float64 matmul 2048^3: {matmul:.1f} GFLOP/s")
    print(f"{'weight':<18} {'[out, in]':<13} {'RTN s':>7} {'GPTQ s':>7} {'GPTQ/RTN':>9} {'GPTQ GFLOP/s':>13} "
          f"{'of matmul':>9}")
    rows = []
    for name, (out, n_in) in SHAPES.items():
        w = (rng.normal(size=(out, n_in)) * 0.02).astype(np.float32)
        H = hessian(n_in, args.tokens, rng)
        t_rtn = median_time(lambda: rtn_quantize(w, 4, args.group_size), args.rounds)
        t_gptq = median_time(lambda: gptq_quantize(w, H, 4, args.group_size), args.rounds)
        flops = 2 * (out * n_in ** 2 + out * n_in * 128 + (1 / 3 + 2) * n_in ** 3)
        rate = flops / t_gptq / 1e9
        rows.append({"weight": name, "shape": [out, n_in], "rtn_s": t_rtn, "gptq_s": t_gptq,
                     "gptq_gflops": rate, "of_matmul": rate / matmul})
        print(f"{name:<18} {str([out, n_in]):<13} {t_rtn:7.3f} {t_gptq:7.2f} {t_gptq / t_rtn:9.1f} {rate:13.1f} "
              f"{rate / matmul:9.2f}")
    summary = {"matmul_gflops": matmul, "group_size": args.group_size, "tokens": args.tokens, "weights": rows}
    if args.layers:
        summary["driver_s_per_layer"] = bench_driver(args.layers)
        print(f"gptq_model, 0.3B widths, {args.layers} layers, 8 x 512 calibration tokens: "
              f"{summary['driver_s_per_layer']:.1f} s per decoder layer")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
