import json
import os

import pytest
from ernie_pack.api import PackOptions, pack

from train_helpers import ROOT, TOKENIZER


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Small pretrain and SFT datasets packed by ernie-pack from the shipped corpus."""
    root = tmp_path_factory.mktemp("data")
    lines = [ln.strip() for f in ("stories.txt", "sentences.txt")
             for ln in open(os.path.join(ROOT, "assets", "corpus", f)) if ln.strip()][:600]
    _write_jsonl(root / "pt.jsonl", [{"text": t} for t in lines])
    pack(PackOptions(mode="pretrain", tokenizer=TOKENIZER, seq_len=64, output=str(root / "pt"),
                     inputs=[str(root / "pt.jsonl")], split="90,10,0"))
    sft = [{"src": [f"What is {a} + {b}?"], "tgt": [str(a + b)]} for a in range(12) for b in range(12)]
    _write_jsonl(root / "sft.jsonl", sft)
    pack(PackOptions(mode="sft", tokenizer=TOKENIZER, seq_len=64, output=str(root / "sft"),
                     inputs=[str(root / "sft.jsonl")]))
    return {"pt": str(root / "pt-train"), "pt_valid": str(root / "pt-valid"), "sft": str(root / "sft"),
            "root": root}


