"""ernie-merge throughput and memory on a multi-shard model, next to `cp` and PEFT's merge_and_unload, in one run.

    .venv/bin/python scripts/bench/merge.py [--layers 36] [--shard 200MB] [--rank 16] [--work DIR]

Builds (once per work dir) a bf16 HF-layout base of ~1.2 GB in 200 MB shards (the 0.3B widths, 36 layers,
random weights written through libernie's ShardedWriter) and a PEFT-format LoRA (r=16 on q/k/v/o/gate/up/down,
random A and B). Then, page cache warm for all of them (each source is read once before timing):
  cp          cp of the base's shards into a fresh directory (copy_file_range): the I/O limit
  ernie-merge the CLI, as a user runs it, same base, same adapter, same 200 MB output shards
  peft        transformers + PEFT in .venv-oracle: from_pretrained(bf16) + PeftModel.from_pretrained +
              merge_and_unload + save_pretrained(max_shard_size=200MB), on torch CPU
cp and ernie-merge run --repeat times, alternating; medians are reported, both to the command's exit (data in
the page cache) and to the end of a following sync (data on disk: the I/O limit for a model too big to cache).
Peak RSS is each child's own VmHWM (/proc/self/status: the resident high-water mark of its address space,
file-backed pages it mapped included; wait4's ru_maxrss would also count the pages this big parent had at fork).
ernie-merge reads and writes with plain file I/O, so the page cache it fills is not part of its RSS. Dirty pages
are flushed (sync) before each timed run.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from libernie.checkpoint import ShardedWriter, from_float32, parse_size
from libernie.checkpoint.names import rules
from libernie.config import ErnieConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORACLE = os.path.join(ROOT, ".venv-oracle", "bin", "python")
MERGE = os.path.join(ROOT, ".venv", "bin", "ernie-merge")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_SIDE = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
torch.set_num_threads(int(sys.argv[4]))
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="200MB")
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(time.perf_counter() - t, int(hwm) / 1024)
"""


def config(layers: int) -> ErnieConfig:
    return ErnieConfig(num_hidden_layers=layers, tie_word_embeddings=True)  # 0.3B widths, deeper


def build_base(path: str, cfg: ErnieConfig, shard: str) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(path, exist_ok=True)
    writer = ShardedWriter(path, parse_size(shard), {"format": "pt"})
    for rule in rules(cfg):
        for name, shape in zip(rule.hf, rule.hf_shapes()):
            w = rng.standard_normal(shape, dtype=np.float32) * 0.02
            writer.add(name, from_float32(1.0 + w if "norm" in name else w, "BF16"), "BF16")
    writer.close()
    cfg.save(path, "hf")


def build_peft_adapter(path: str, cfg: ErnieConfig, r: int) -> None:
    from safetensors.numpy import save_file
    rng = np.random.default_rng(1)
    sizes = {"q_proj": (cfg.hidden_size, cfg.q_size), "k_proj": (cfg.hidden_size, cfg.kv_size),
             "v_proj": (cfg.hidden_size, cfg.kv_size), "o_proj": (cfg.q_size, cfg.hidden_size),
             "gate_proj": (cfg.hidden_size, cfg.intermediate_size), "up_proj": (cfg.hidden_size, cfg.intermediate_size),
             "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for t in TARGETS:
            n_in, n_out = sizes[t]
            part = "self_attn" if t in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[key + ".lora_A.weight"] = rng.standard_normal((r, n_in), dtype=np.float32) * 0.01
            tensors[key + ".lora_B.weight"] = rng.standard_normal((n_out, r), dtype=np.float32) * 0.01
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": TARGETS,
                   "base_model_name_or_path": None, "task_type": "CAUSAL_LM"}, f)


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds to exit, seconds to exit + sync, stdout) of one child process, started after a sync so no earlier
    writeback is billed to it. The second number is the time until its output is on disk."""
    os.sync()
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    status = p.wait()
    wall = time.perf_counter() - t
    os.sync()
    durable = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"{cmd[0]} failed: {err.decode()[-2000:]}")
    return wall, durable, out.decode()


def shard_files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--shard", default="200MB")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "bench-merge"))
    ap.add_argument("--repeat", type=int, default=3, help="runs of cp and ernie-merge (medians are reported)")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    cfg = config(args.layers)
    base, adapter = os.path.join(args.work, "base"), os.path.join(args.work, "adapter")
    if not os.path.isfile(os.path.join(base, "config.json")):
        build_base(base, cfg, args.shard)
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        build_peft_adapter(adapter, cfg, args.rank)
    shards = shard_files(base)
    total = sum(os.path.getsize(s) for s in shards)
    largest = max(os.path.getsize(s) for s in shards) / 1e6
    warm(shards + [os.path.join(adapter, "adapter_model.safetensors")])
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    res = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "threads": threads, "base_bytes": total,
           "shards": len(shards), "largest_shard_mb": round(largest, 1), "layers": args.layers, "rank": args.rank,
           "adapter_mb": round(os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")) / 1e6, 1)}

    def cp() -> tuple[float, float]:
        dst = os.path.join(args.work, "cp")
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        wall, durable, _ = run_child(["cp", *shards, dst])
        shutil.rmtree(dst)
        return wall, durable

    def merge(name: str, extra: list[str]) -> tuple[float, float, dict]:
        out = os.path.join(args.work, name)
        wall, durable, stdout = run_child([MERGE, "--base", base, *extra, "-o", out, "--max-shard-size", args.shard,
                                           "--force", "-q"])
        return wall, durable, json.loads(stdout)

    # Alternate the runs so that drift in the machine's load and disk state hits all of them alike; report medians.
    runs = {"cp": [], "ernie-merge": [], "ernie-merge-convert": []}
    for _ in range(args.repeat):
        runs["cp"].append(cp() + ({},))
        runs["ernie-merge"].append(merge("ernie-merge", ["--adapter", adapter]))
        runs["ernie-merge-convert"].append(merge("ernie-merge-convert", ["--layout", "paddle"]))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
    for name, v in runs.items():
        wall, durable = med[name]
        res[name] = {"seconds": round(wall, 2), "seconds_to_disk": round(durable, 2),
                     "runs": [round(r[0], 2) for r in v], "runs_to_disk": [round(r[1], 2) for r in v],
                     "gb_per_s": round(total / wall / 1e9, 3), "gb_per_s_to_disk": round(total / durable / 1e9, 3),
                     "x_cp_speed": round(med["cp"][0] / wall, 2), "x_cp_speed_to_disk": round(med["cp"][1] / durable, 2)}
        if v[0][2]:
            rss = max(r[2]["peak_rss_mb"] for r in v)
            res[name].update(peak_rss_mb=rss, rss_over_largest_shard=round(rss / largest, 2),
                             tensors_merged=v[0][2]["tensors_merged"],
                             in_process_seconds=round(statistics.median(r[2]["seconds"] for r in v), 2))
    cp_s = med["cp"][0]

    if not args.skip_peft and os.path.exists(ORACLE):
        out = os.path.join(args.work, "peft")
        shutil.rmtree(out, ignore_errors=True)
        wall, durable, stdout = run_child([ORACLE, "-c", PEFT_SIDE, base, adapter, out, threads])
        inner, rss = (float(x) for x in stdout.split())
        res["peft"] = {"seconds": round(wall, 2), "seconds_to_disk": round(durable, 2),
                       "gb_per_s": round(total / wall / 1e9, 3), "peak_rss_mb": round(rss, 1),
                       "rss_over_largest_shard": round(rss / largest, 2), "x_cp_speed": round(cp_s / wall, 2),
                       "load_merge_save_seconds": round(inner, 2)}
        res["peft"]["agreement"] = compare(os.path.join(args.work, "ernie-merge"), out)
        shutil.rmtree(out, ignore_errors=True)
    res["self_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(res, indent=2))


def compare(ours: str, peft: str) -> dict:
    """Max |ours - PEFT| over one merged projection (both bf16): PEFT adds a bf16-rounded delta, we round once."""
    from libernie.checkpoint import CheckpointReader, to_float32
    name = "model.layers.0.self_attn.q_proj.weight"
    a, da = CheckpointReader(ours).get(name)
    b, db = CheckpointReader(peft).get(name)
    x, y = to_float32(np.asarray(a), da), to_float32(np.asarray(b), db)
    return {"tensor": name, "max_abs_diff": float(np.abs(x - y).max()), "equal_fraction": float((x == y).mean())}


if __name__ == "__main__":
    sys.exit(main())
