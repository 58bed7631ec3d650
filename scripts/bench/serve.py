"""ernie-serve throughput and time to first token, against in-process generate() and transformers.

    .venv/bin/python scripts/bench/serve.py [--preset ernie-small] [--prompt-len 128] [--new-tokens 64] \
        [--concurrency 1,4,8] [--iters 3]

One run does, on one random checkpoint of `--preset` (vocabulary of assets/tokenizer):
  1. in-process: libernie.generate() on a batch of c prompts (the limit for any server),
  2. HTTP: `ernie-serve DIR --max-batch 8` as a subprocess, c concurrent streaming /v1/completions,
  3. transformers' generate() on CPU torch in .venv-oracle (single stream), if it is installed.
All greedy, eos ignored, so every stream makes exactly --new-tokens tokens. TTFT is the time to the
first new token (prefill included); decode tok/s is aggregate output tokens over wall time.
Prints one JSON object on stdout, a table on stderr. The HTTP client runs in this process and
shares the 2 cores with the server: that cost is part of what is measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import libernie  # noqa: F401  (CPU env defaults before paddle)
import numpy as np
import paddle

from libernie.config import PRESETS
from libernie.model import ErnieForCausalLM
from libernie.tokenizer import ErnieTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORACLE = os.path.join(ROOT, ".venv-oracle", "bin", "python")
BIN = os.path.dirname(sys.executable)


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(10, vocab, size=length).tolist() for _ in range(n)]


def in_process(model, batch: list[list[int]], new_tokens: int) -> dict:
    """One timed round of libernie.generate() on the batch: TTFT (1 token), then the whole run."""
    def timed(n):
        t = time.perf_counter()
        out = model.generate(batch, max_new_tokens=n, temperature=0.0, eos_token_id=-1)
        if any(len(o) != n for o in out):
            raise SystemExit("generate() stopped early; the timing would not compare like with like")
        return time.perf_counter() - t

    return {"ttft_s": timed(1), "total_s": timed(new_tokens)}


async def _one(client, prompt, new_tokens) -> tuple[float, float, int]:
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, usage = time.perf_counter(), None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"]:
                    first = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
    return first, time.perf_counter() - t0, usage["completion_tokens"]


def over_http(url: str, batch: list[list[int]], new_tokens: int) -> dict:
    """One round of len(batch) concurrent streaming requests: mean TTFT, wall time of the round."""
    import httpx

    async def round_():
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            t = time.perf_counter()
            res = await asyncio.gather(*(_one(c, p, new_tokens) for p in batch))
            return time.perf_counter() - t, res

    wall, res = asyncio.run(round_())
    if any(n != new_tokens for _, _, n in res):
        raise SystemExit("a request stopped early; the timing would not compare like with like")
    return {"ttft_s": statistics.mean(f for f, _, _ in res), "total_s": wall}


def _median(rounds: list[dict], streams: int, new_tokens: int) -> dict:
    out = {k: statistics.median(r[k] for r in rounds) for k in ("ttft_s", "total_s")}
    out["tok_s"] = streams * new_tokens / out["total_s"]
    return out


def start_server(model_dir: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([os.path.join(BIN, "ernie-serve"), model_dir, "--port", str(port), "--max-batch",
                             str(max_batch), "-q"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"ernie-serve exited with {proc.returncode}")
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("ernie-serve did not become healthy in 60 s")


def transformers_single(model_dir: str, prompt: list[int], new_tokens: int, iters: int) -> dict | None:
    if not os.path.exists(ORACLE):
        return None
    r = subprocess.run([ORACLE, os.path.join(os.path.dirname(__file__), "_hf_generate.py"), model_dir,
                        json.dumps(prompt), str(new_tokens), str(iters)], capture_output=True, text=True, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    total = statistics.median(d["total"])
    return {"ttft_s": statistics.median(d["ttft"]), "total_s": total, "tok_s": new_tokens / total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ernie-small", choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tok = ErnieTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tokenizer"))
    paddle.seed(0)
    cfg = PRESETS[args.preset]() if args.preset != "ernie-tiny" else PRESETS[args.preset](tok.vocab_size)
    cfg.vocab_size = tok.vocab_size
    all_prompts = prompts(max(levels), args.prompt_len, tok.vocab_size)
    res = {"preset": args.preset, "vocab": cfg.vocab_size, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "threads": os.environ.get("OMP_NUM_THREADS"), "levels": {}}
    with tempfile.TemporaryDirectory() as d:
        ErnieForCausalLM(cfg).save_pretrained(d, layout="hf")
        tok.save_pretrained(d)
        model = ErnieForCausalLM.from_pretrained(d)
        proc, url = start_server(d, max(8, max(levels)))
        try:  # alternate in-process and HTTP rounds, so load from other processes hits both alike
            for c in levels:
                batch = all_prompts[:c]
                in_process(model, batch, 2), over_http(url, batch, 2)          # warm-up
                ours, http = [], []
                for _ in range(args.iters):
                    ours.append(in_process(model, batch, args.new_tokens))
                    http.append(over_http(url, batch, args.new_tokens))
                res["levels"][c] = {"in_process": _median(ours, c, args.new_tokens),
                                    "http": _median(http, c, args.new_tokens)}
        finally:
            proc.terminate()
            proc.wait(60)
        del model
        hf = transformers_single(d, all_prompts[0], args.new_tokens, args.iters)
    res["load_average_1m_at_end"] = os.getloadavg()[0]
    for c, lv in res["levels"].items():
        lv["http_overhead"] = 1 - lv["http"]["tok_s"] / lv["in_process"]["tok_s"]
    one = res["levels"][levels[0]]
    res["http_scaling_max_over_first"] = res["levels"][levels[-1]]["http"]["tok_s"] / one["http"]["tok_s"]
    if hf:
        res["transformers_single"] = hf
        res["single_stream_libernie_over_transformers"] = one["in_process"]["tok_s"] / hf["tok_s"]
        res["single_stream_http_over_transformers"] = one["http"]["tok_s"] / hf["tok_s"]
    _table(res, levels)
    print(json.dumps(_rounded(res)))
    return 0


def _table(res, levels) -> None:
    w = sys.stderr.write
    w("| concurrency | in-process tok/s | HTTP tok/s | HTTP overhead | in-process TTFT ms | HTTP TTFT ms |\n")
    w("| --- | --- | --- | --- | --- | --- |\n")
    for c in levels:
        lv = res["levels"][c]
        w(f"| {c} | {lv['in_process']['tok_s']:.1f} | {lv['http']['tok_s']:.1f} | {100 * lv['http_overhead']:.1f}% "
          f"| {1000 * lv['in_process']['ttft_s']:.1f} | {1000 * lv['http']['ttft_s']:.1f} |\n")
    if "transformers_single" in res:
        hf = res["transformers_single"]
        w(f"transformers single stream: {hf['tok_s']:.1f} tok/s, TTFT {1000 * hf['ttft_s']:.1f} ms\n")


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {str(k): _rounded(v) for k, v in x.items()}
    return x


if __name__ == "__main__":
    sys.exit(main())
