"""Tiny models and packed text for the ernie-quant tests: a random ernie_tiny with the shipped tokenizer, and
ernie-pack shards of the shipped corpus (the same tokenizer, so calibration and --eval accept them)."""
import json
import os
import shutil

import numpy as np
import paddle

from libernie.config import ernie_tiny
from libernie.model import ErnieForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")
IDS = [[5, 9, 1, 33, 2, 60, 7, 7, 12, 40, 300, 1999], [3, 14, 15, 9, 26, 53, 58, 9, 7, 9, 1024, 77]]


def make_model(path, layout="paddle", dtype=None, shard="200KB", seed=0, tied=True, use_bias=False):
    """Save a random ernie_tiny (vocab 2048, the shipped tokenizer's) with tokenizer files; return it (fp32)."""
    paddle.seed(seed)
    cfg = ernie_tiny(vocab_size=2048)
    cfg.tie_word_embeddings, cfg.use_bias = tied, use_bias
    model = ErnieForCausalLM(cfg)
    with paddle.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.set_value(1.0 + 0.2 * paddle.randn(p.shape))
            elif name.endswith("bias"):
                p.set_value(0.05 * paddle.randn(p.shape))
    model.save_pretrained(path, layout=layout, max_shard_size=shard, dtype=dtype)
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), os.path.join(path, f))
    return ErnieForCausalLM.from_pretrained(path)


def make_data(prefix, lines=120, seq_len=64, source="stories.txt", tokenizer=TOKENIZER):
    """Pack the first `lines` lines of assets/corpus/<source> (pretrain mode) at `prefix`."""
    from ernie_pack.api import PackOptions, pack
    src = os.path.join(ROOT, "assets", "corpus", source)
    jsonl = str(prefix) + ".in.jsonl"
    with open(src) as f, open(jsonl, "w") as out:
        for line in [x.strip() for x in f if x.strip()][:lines]:
            out.write(json.dumps({"text": line}) + "\n")
    pack(PackOptions(mode="pretrain", tokenizer=tokenizer, seq_len=seq_len, output=str(prefix), inputs=[jsonl]))
    return str(prefix)


def logits(model_or_path, ids=IDS) -> np.ndarray:
    model = ErnieForCausalLM.from_pretrained(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) \
        else model_or_path
    with paddle.no_grad():
        return model(paddle.to_tensor(ids)).logits.numpy()
