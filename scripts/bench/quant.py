"""ernie-quant: quality (perplexity cost), streaming throughput next to `cp`, peak memory, and serving a wint8
model next to fp32, each against its yardstick measured in the same run.

    .venv/bin/python scripts/bench/quant.py [--demo demo-out] [--layers 12] [--shard 200MB] [--work out/bench-quant]
        [--skip quality|throughput|serve ...] [--serve-rounds 3]

quality     on the trained demo model (the pretrained checkpoint of `make demo`) and on a larger model trained
            here once
            (hidden 256, 4 layers, ernie-train pretrain on the demo's packed corpus, cached in WORK): ernie-quant
            wint8 (RTN), fp8, and wint4 RTN and GPTQ (when libernie.quant.gptq_model is present), in groups and
            per channel, with --eval on the held-out split: held-out perplexity of base and quantized, increase.
throughput  random bf16 bases (Paddle layout): the continuity row (0.3B widths, --layers layers, --shard shards),
            then --scale configurations (the real 0.3B; ERNIE-4.5-21B-A3B widths growing in layers and in
            shard size, up to 4 GB shards): `ernie-quant wint8`, `wint4` (RTN) and `fp8 --calib` each against
            `cp -r` of the same shards, run in turn (A B A B ..., --runs pairs after a warm-up pair; ratio per
            pair, median), whole process; for fp8 also its write pass alone (the summary's write_seconds)
            against the cp of its pair; peak RSS (VmHWM, from the summary) against the largest shard; the
            load average before and after. On the continuity base also `ernie-quant --help` against the same
            cp (start-up alone: the whole-process ratio is at most cp / (start-up + cp)) and the peak RSS of
            `import libernie, paddle` (the fixed memory floor of fp8's calibration).
serve       ernie-serve on the same base (loaded fp32 on CPU) and on its wint8 (default, and with
            --quantize-embeddings) and fp8 outputs: parameter + buffer bytes of the loaded model (a separate
            process), each server's VmRSS once healthy (all servers up at once), and greedy decode tokens/s of one
            request (64-token completion minus a 1-token one), the servers answering in turn for --serve-rounds
            rounds; ratios against the same round's fp32, medians. Then the decode step of every config in one
            process (no HTTP), configs alternating for --serve-rounds rounds.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from libernie.checkpoint import ShardedWriter, from_float32, parse_size
from libernie.checkpoint.names import rules
from libernie.config import ErnieConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, ".venv", "bin")
PY = os.path.join(BIN, "python")
QUANT = os.path.join(BIN, "ernie-quant")

LARGER = {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 2048,
          "rope_theta": 10000.0, "tie_word_embeddings": True, "model_type": "ernie4_5"}

WEIGHTS_SIDE = r"""
import json, sys
import numpy as np
from libernie.model import ErnieForCausalLM
m = ErnieForCausalLM.from_pretrained(sys.argv[1])
n = sum(int(np.prod(p.shape)) * p.element_size() for p in m.parameters())
n += sum(int(np.prod(b.shape)) * b.element_size() for b in m.buffers() if b is not None)
print(json.dumps({"weight_bytes": n}))
"""


def run_json(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def have_gptq() -> bool:
    try:
        import libernie.quant.gptq_model  # noqa: F401
        return True
    except ImportError:
        return False


# ---- quality --------------------------------------------------------------------------------------------
def larger_model(work: str, demo: str) -> str:
    """Train (once) a 4-layer hidden-256 ERNIE on the demo's pretrain shards; returns its checkpoint dir."""
    out = os.path.join(work, "larger")
    done = os.path.join(out, "pretrain.json")
    if not os.path.exists(done):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "init-config.json"), "w") as f:
            json.dump(LARGER, f)
        cmd = [os.path.join(BIN, "ernie-train"), "pretrain", "-q", "--data", f"{demo}/data/pt-train",
               "--init-config", os.path.join(out, "init-config.json"), "--tokenizer", f"{demo}/tokenizer",
               "-o", os.path.join(out, "run"), "--max-steps", "300", "--save-steps", "300",
               "--learning-rate", "2e-3", "--min-lr", "2e-4", "--warmup-steps", "20",
               "--per-device-train-batch-size", "8"]
        summary = run_json(cmd)
        with open(done, "w") as f:
            json.dump(summary, f)
    ckpt = json.load(open(done))["checkpoint"]
    if not os.path.exists(os.path.join(ckpt, "tokenizer.model")):
        shutil.copy(os.path.join(demo, "tokenizer", "tokenizer.model"), ckpt)
    return ckpt


def quality(name: str, model: str, demo: str, work: str) -> list[dict]:
    cfg = ErnieConfig.from_file(model)
    gs = next(g for g in (128, 64, 32, 16, 8) if cfg.hidden_size % g == 0 and cfg.intermediate_size % g == 0
              and cfg.q_size % g == 0)
    calib = ["--calib", f"{demo}/data/pt-train"]
    runs = [("wint8", []), ("wint8", ["--quantize-embeddings"]), ("fp8", calib)]
    for g in (str(gs), "-1"):   # groups, then per channel (coarser: where GPTQ has more to recover)
        runs.append(("wint4", ["--group-size", g]))
        if have_gptq():
            runs.append(("wint4", ["--group-size", g, "--algo", "gptq", *calib]))
    rows = []
    for method, extra in runs:
        out = os.path.join(work, f"{name}-{method}" + ("-emb" if "--quantize-embeddings" in extra else ""))
        s = run_json([QUANT, method, "-q", "--model", model, "-o", out, "--force", "--eval", f"{demo}/data/pt-valid",
                      "--eval-samples", "64", "--calib-samples", "64", *extra])
        e = s["eval"]
        rows.append({"model": name, "method": method, "algo": s["algo"], "group_size": s["group_size"],
                     "quantize_embeddings": s.get("quantize_embeddings", False),
                     "base_ppl": round(e["base_ppl"], 4), "quant_ppl": round(e["quant_ppl"], 4),
                     "ppl_increase_pct": round(e["ppl_delta_pct"], 3), "eval_tokens": e["tokens"],
                     "max_layer_error": s["max_layer_error"], "compression": s["compression"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- throughput ---------------------------------------------------------------------------------------
# Widths of the bases the throughput section builds (random bf16 weights, Paddle layout, tied embedding, the real
# 103,424-token vocabulary): the 0.3B's, and the dense layer and MoE layer of ERNIE-4.5-21B-A3B (FACTS).
WIDTHS = {
    "0.3b": {},
    "21b-dense": {"hidden_size": 2560, "intermediate_size": 12288, "num_attention_heads": 20,
                  "num_key_value_heads": 4, "head_dim": 128},
    "21b-moe": {"hidden_size": 2560, "intermediate_size": 12288, "num_attention_heads": 20, "num_key_value_heads": 4,
                "head_dim": 128, "moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536,
                "moe_num_shared_experts": 2, "moe_layer_start_index": 1},
}
# The scaling configurations (WIDTHS:LAYERS:SHARD): the real 0.3B (18 layers) at the default --max-shard-size
# (save_pretrained's 5GB: one shard), then the 21B-A3B dense width growing at 1 GB shards, the same model in one
# shard (growing shard), a 4 GB model in one 4 GB shard (the size real ERNIE 4.5 checkpoints ship), and the real
# 21B-A3B's first layers (one dense, two MoE of 64 experts + 2 shared) in 5 GB shards.
SCALE = ["0.3b:18:5GB", "21b-dense:4:1GB", "21b-dense:8:1GB", "21b-dense:8:5GB", "21b-dense:16:5GB",
         "21b-moe:3:5GB"]


def build_base(path: str, layers: int, shard: str, widths: str = "0.3b") -> None:
    if os.path.exists(os.path.join(path, "config.json")):
        return
    cfg = ErnieConfig(num_hidden_layers=layers, tie_word_embeddings=True, **WIDTHS[widths])
    rng = np.random.default_rng(0)
    os.makedirs(path + ".partial", exist_ok=True)
    writer = ShardedWriter(path + ".partial", parse_size(shard), {"format": "np"})
    for rule in rules(cfg):
        w = rng.standard_normal(rule.paddle_shape, dtype=np.float32)
        w *= 0.02
        if "norm" in rule.paddle:
            w += 1.0
        writer.add(rule.paddle, from_float32(w, "BF16"), "BF16")
        del w
    writer.close()
    cfg.save(path + ".partial", "paddle")
    os.replace(path + ".partial", path)


def _warm(paths: list[str]) -> None:
    for p in paths:  # page cache warm for every command alike
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def run_timed(cmd: list[str], stdout: str | None = None) -> dict:
    """Run cmd (no shell unless it is ['sh', '-c', ...]); whole-process wall seconds, user+sys seconds and peak
    RSS (ru_maxrss of the child, MiB) from the kernel's accounting (os.wait4), as `/usr/bin/time -v` reports."""
    out = open(stdout, "w") if stdout else subprocess.DEVNULL
    try:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        err = proc.stderr.read()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if stdout:
            out.close()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "peak_mb": ru.ru_maxrss / 1024}


def alternate(a: list[str], b: list[str], runs: int, a_out: str | None = None) -> list[tuple[dict, dict]]:
    """A and B in turn (A B A B ...) after one warm-up pair: a drifting machine speed hits both alike, and each
    ratio is taken pair by pair. A's stdout of each run is appended to a_out.jsonl when given."""
    pairs = []
    for i in range(runs + 1):
        ra = run_timed(a, a_out + f".{i}" if a_out else None)
        if a_out:
            ra["summary"] = json.loads(open(a_out + f".{i}").read().strip().splitlines()[-1])
        rb = run_timed(b)
        if i:
            pairs.append((ra, rb))
    return pairs


def _median(xs):
    return float(np.median(xs))


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def throughput_one(work: str, widths: str, layers: int, shard: str, demo: str, runs: int, keep: bool = False,
                   startup: bool = False) -> dict:
    """One base: ernie-quant wint8, wint4 (RTN) and fp8 against `cp -r` of the same shards, alternating."""
    name = f"base-{layers}" if widths == "0.3b" and keep else f"base-{widths}-{layers}-{shard}"
    base = os.path.join(work, name)
    build_base(base, layers, shard, widths)
    shards = [os.path.join(base, f) for f in os.listdir(base) if f.endswith(".safetensors")]
    total = sum(os.path.getsize(p) for p in shards)
    largest = max(os.path.getsize(p) for p in shards)
    _warm(shards)
    dst = os.path.join(work, "dst" if keep else "dst-scale")
    cp = ["sh", "-c", f"rm -rf {dst}-cp && cp -r {base} {dst}-cp"]
    res = {"widths": widths, "layers": layers, "shard": shard, "base_bytes": total, "shards": len(shards),
           "largest_shard_mb": round(largest / 2**20, 1), "load_before": _loadavg()}
    # token ids < 2048 fit any vocabulary here. Calibration is a forward pass over the calibration tokens (compute,
    # reported as calib_s); the scale rows keep it small (2 x 64 tokens) so the write pass and memory are measured
    calib = ["--calib", f"{demo}/data/pt-valid", "--calib-samples", "4"] if keep else \
        ["--calib", f"{demo}/data/pt-valid", "--calib-samples", "2", "--seq-len", "64"]
    for method, extra in (("wint8", []), ("wint4", []), ("fp8", calib)):
        out = f"{dst}-{method}" if method != "wint8" else f"{dst}-w8"
        cmd = [QUANT, method, "-q", "--force", "--model", base, "-o", out, "--max-shard-size", shard, *extra]
        pairs = alternate(cmd, cp, runs, a_out=os.path.join(work, f"{method}.json"))
        s = [a["summary"] for a, _ in pairs]
        r = {"wall_s": round(_median([a["wall"] for a, _ in pairs]), 3),
             "cpu_s": round(_median([a["cpu"] for a, _ in pairs]), 3),
             "cp_wall_s": round(_median([b["wall"] for _, b in pairs]), 3),
             "throughput_vs_cp": round(_median([b["wall"] / a["wall"] for a, b in pairs]), 3),
             "peak_rss_mb": round(max(x["peak_rss_mb"] for x in s), 1),
             "peak_rss_vs_largest_shard": round(max(x["peak_rss_mb"] for x in s) / (largest / 2**20), 3),
             "mb_per_s_whole": round(total / 1e6 / _median([a["wall"] for a, _ in pairs]), 1)}
        if method == "fp8":  # the write pass alone (the summary's write_seconds) against the cp of its pair
            r["write_s"] = round(_median([x["write_seconds"] for x in s]), 3)
            r["write_pass_vs_cp"] = round(_median([b["wall"] / x["write_seconds"] for (_, b), x in zip(pairs, s)]),
                                          3)
            r["calib_s"] = round(_median([x["calib"]["seconds"] for x in s]), 3)
        res[method] = r
        if not (keep and method == "wint8"):
            shutil.rmtree(out, ignore_errors=True)
    if startup:  # the floor of any Python CLI here: start-up and imports alone (`--help`), against the same cp
        pairs = alternate([QUANT, "--help"], cp, runs)
        f = _median([a["wall"] / b["wall"] for a, b in pairs])
        res["startup"] = {"wall_s": round(_median([a["wall"] for a, _ in pairs]), 3),
                          "time_vs_cp": round(f, 3), "best_possible_throughput_vs_cp": round(1 / (1 + f), 3)}
        # and the fixed memory floor fp8 adds: the interpreter with libernie and paddle imported
        res["import_paddle_peak_mb"] = round(run_timed([PY, "-c", "import libernie, paddle"])["peak_mb"], 1)
    shutil.rmtree(f"{dst}-cp", ignore_errors=True)
    res["load_after"] = _loadavg()
    print(json.dumps(res), flush=True)
    return res


def throughput(work: str, layers: int, shard: str, demo: str, scale: list[str], runs: int) -> dict:
    """The continuity row (--layers, --shard; its base and wint8 output stay for the serve section), then every
    SCALE configuration: throughput and peak RSS as the model and the shards grow."""
    res = {"continuity": throughput_one(work, "0.3b", layers, shard, demo, runs, keep=True, startup=True)}
    for spec in scale:
        widths, n, sh = spec.split(":")
        res[spec] = throughput_one(work, widths, int(n), sh, demo, runs)
    return res


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1]) / 1024


class Served:
    """An ernie-serve subprocess on a free port: VmRSS once healthy, then timed greedy completions."""

    def __init__(self, model: str, tokenizer: str):
        import socket
        import urllib.request
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        self.proc = subprocess.Popen([os.path.join(BIN, "ernie-serve"), model, "--port", str(port), "-q",
                                      "--tokenizer", tokenizer], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            if self.proc.poll() is not None:
                raise SystemExit(f"ernie-serve {model} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        self.rss_mb = round(_rss_mb(self.proc.pid), 1)
        self.complete(4)                                                     # warm-up

    def complete(self, n: int) -> float:
        import urllib.request
        body = json.dumps({"prompt": "The river is wide and the bridge is old", "max_tokens": n,
                           "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", body, {"Content-Type": "application/json"})
        t = time.perf_counter()
        json.load(urllib.request.urlopen(req, timeout=600))
        return time.perf_counter() - t

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


SERVE_CONFIGS = [  # name, ernie-quant arguments (None: the float base itself)
    ("fp32", None),
    ("wint8", ["wint8"]),
    ("wint8-emb", ["wint8", "--quantize-embeddings"]),
    ("fp8", ["fp8", "--calib-samples", "4"]),
]


DECODE_SIDE = r"""
import json, sys, time
import numpy as np, paddle
from libernie.model import ErnieForCausalLM
rounds, paths = int(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:])
models = {n: ErnieForCausalLM.from_pretrained(p) for n, p in paths.items()}
ids = paddle.to_tensor([[5, 9, 1, 33, 2, 60, 7, 7]])

@paddle.no_grad()
def step_seconds(m, n=16):
    cache = m.new_cache()
    tok = paddle.argmax(m(ids, cache=cache, logits_to_keep=1).logits[:, -1], -1, keepdim=True)
    t = time.perf_counter()
    for _ in range(n):
        tok = paddle.argmax(m(tok, cache=cache, logits_to_keep=1).logits[:, -1], -1, keepdim=True)
    return (time.perf_counter() - t) / n

res = {n: [] for n in models}
for _ in range(rounds):
    for n, m in models.items():
        res[n].append(round(1e3 * step_seconds(m), 2))
print(json.dumps(res))
"""


def decode_in_process(paths: dict, rounds: int) -> dict:
    """Greedy decode step (ms, batch 1, 16 steps after an 8-token prompt) of every config loaded in ONE process,
    configs alternating round by round: the model's own cost without HTTP, threads and scheduling."""
    res = run_json([PY, "-c", DECODE_SIDE, str(rounds), *[f"{n}={p}" for n, p in paths.items()]])
    out = {"step_ms": res}
    for n, v in res.items():
        out[n] = {"median_step_ms": float(np.median(v)),
                  "speed_ratio_vs_fp32": round(float(np.median([b / a for a, b in zip(v, res["fp32"])])), 3)}
    return out


def serve(work: str, layers: int, shard: str, demo: str, rounds: int = 3, tokens: int = 64) -> dict:
    """Each config's weight bytes (a separate process); then one server per config, all up at once (VmRSS of
    each once healthy), and `rounds` rounds in which every server in turn answers a 1-token and a `tokens`-token
    greedy completion: decode tokens/s = (tokens - 1) / (t_tokens - t_1). Alternating request by request, so
    load changes hit every config alike; ratios are taken within a round against fp32, reported as medians."""
    base = os.path.join(work, f"base-{layers}")
    build_base(base, layers, shard)
    tokenizer = os.path.join(demo, "tokenizer")
    calib = ["--calib", f"{demo}/data/pt-valid"]  # token ids < 2048 fit the 103424 vocabulary
    paths = {}
    for name, args in SERVE_CONFIGS:
        if args is None:
            paths[name] = base
            continue
        paths[name] = os.path.join(work, f"serve-{name}")
        run_json([QUANT, *args, "-q", "--force", "--model", base, "-o", paths[name],
                  *(calib if args[0] == "fp8" else [])])
    res = {name: {**run_json([PY, "-c", WEIGHTS_SIDE, p]), "decode_tok_s": []} for name, p in paths.items()}
    servers = {}
    try:
        for name, p in paths.items():
            servers[name] = Served(p, tokenizer)
            res[name]["rss_mb"] = servers[name].rss_mb
        with open("/proc/loadavg") as f:
            res["loadavg_start"] = f.read().split()[:3]
        for r in range(rounds):
            for name, srv in servers.items():
                one, full = srv.complete(1), srv.complete(tokens)
                res[name]["decode_tok_s"].append(round((tokens - 1) / (full - one), 2))
            print(json.dumps({"round": r, **{n: res[n]["decode_tok_s"][-1] for n in servers}}), flush=True)
        with open("/proc/loadavg") as f:
            res["loadavg_end"] = f.read().split()[:3]
    finally:
        for srv in servers.values():
            srv.stop()
    res["in_process"] = decode_in_process(paths, rounds)
    print(json.dumps({"in_process": res["in_process"]}), flush=True)
    fp = res["fp32"]
    for name in paths:
        row = res[name]
        row["weight_bytes_ratio"] = round(row["weight_bytes"] / fp["weight_bytes"], 3)
        row["rss_ratio"] = round(row["rss_mb"] / fp["rss_mb"], 3)
        row["decode_ratio"] = round(float(np.median([a / b for a, b in zip(row["decode_tok_s"],
                                                                             fp["decode_tok_s"])])), 3)
        print(json.dumps({name: row}), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", default=os.path.join(ROOT, "demo-out"), help="`make demo` output directory")
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "bench-quant"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shard", default="200MB")
    ap.add_argument("--skip", action="append", default=[], choices=["quality", "throughput", "serve"])
    ap.add_argument("--serve-rounds", type=int, default=3, help="alternating rounds of the serve section")
    ap.add_argument("--scale", nargs="*", default=SCALE, metavar="WIDTHS:LAYERS:SHARD",
                    help=f"throughput at these sizes too (WIDTHS one of {', '.join(WIDTHS)}); none: --scale")
    ap.add_argument("--runs", type=int, default=3, help="alternating pairs per throughput measurement")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if not os.path.isdir(os.path.join(a.demo, "chat-model")):
        raise SystemExit(f"{a.demo}/chat-model: not found; run `make demo` first (or pass --demo)")
    report = {}
    if "quality" not in a.skip:
        # the demo's pretrained model, on the held-out split of its own pretraining corpus (the merged chat model
        # is SFT'd on arithmetic: that text is not its distribution, so its deltas there say little)
        pretrained = json.load(open(os.path.join(a.demo, "pretrain.json")))["checkpoint"]
        report["quality"] = quality("demo-pretrain", pretrained, a.demo, a.work)
        report["quality"] += quality("larger", larger_model(a.work, a.demo), a.demo, a.work)
    if "throughput" not in a.skip:
        report["throughput"] = throughput(a.work, a.layers, a.shard, a.demo, a.scale, a.runs)
    if "serve" not in a.skip:
        report["serve"] = serve(a.work, a.layers, a.shard, a.demo, a.serve_rounds)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
