"""Helpers shared by the ernie-train tests (imported by name: pytest puts this folder on sys.path)."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")


def base_args(data, out, **over):
    """CLI arguments of a tiny pretrain run; `over` maps option names to values (None drops the option)."""
    opts = {"--data": data["pt"], "--init-config": "ernie-tiny", "--tokenizer": TOKENIZER, "-o": str(out),
            "--max-steps": "6", "--logging-steps": "1", "--save-steps": "3", "--learning-rate": "3e-3",
            "--per-device-train-batch-size": "2"}
    opts.update(over)
    args = []
    for k, v in opts.items():
        if v is None:
            continue
        args += [k] if v is True else [k, str(v)]
    return args


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "metrics.jsonl"))]
