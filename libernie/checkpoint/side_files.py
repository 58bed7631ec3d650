"""What a tool carries from one checkpoint directory to the one it writes, besides the weights."""
from __future__ import annotations

import os
import shutil

from libernie.checkpoint.sharded import INDEX, SINGLE

_SKIP_FILES = {INDEX, SINGLE, "config.json"}
# Never carried: other weights (stale once rewritten) and training state (an ernie-train checkpoint as input).
_SKIP_SUFFIXES = (".safetensors", ".partial", ".safetensors.index.json", ".bin", ".pdparams", ".pdopt", ".pt", ".pth",
                  ".ckpt")
_SKIP_PREFIXES = ("trainer_state", "optimizer", "scheduler", "rng_state", "training_args")


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy tokenizer files, chat template, generation config...: every regular file of src_dir but weights,
    config.json, training state and hidden files. Returns the names copied, sorted."""
    copied = []
    for fname in sorted(os.listdir(src_dir)):
        p = os.path.join(src_dir, fname)
        if (fname in _SKIP_FILES or fname.endswith(_SKIP_SUFFIXES) or fname.startswith(_SKIP_PREFIXES)
                or fname.startswith(".") or not os.path.isfile(p)):
            continue
        shutil.copy2(p, os.path.join(dst_dir, fname))
        copied.append(fname)
    return copied
