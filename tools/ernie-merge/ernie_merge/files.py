"""What ernie-merge carries along besides weights, and what it records: side files, provenance, peak memory."""
from __future__ import annotations

import os
import shutil

from libernie.checkpoint.sharded import INDEX, SINGLE

from ernie_merge.adapters import Adapter

_SKIP_FILES = {INDEX, SINGLE, "config.json"}
# Never carried: other weights (stale after a merge) and training state (an ernie-train checkpoint as the base).
_SKIP_SUFFIXES = (".safetensors", ".partial", ".safetensors.index.json", ".bin", ".pdparams", ".pdopt", ".pt", ".pth",
                  ".ckpt")
_SKIP_PREFIXES = ("trainer_state", "optimizer", "scheduler", "rng_state", "training_args")


def peak_rss_mb() -> float:
    """High-water mark of the resident set (VmHWM), in MB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Tokenizer files, chat template, generation config...: every regular file but weights, config and
    training state."""
    copied = []
    for fname in sorted(os.listdir(src_dir)):
        p = os.path.join(src_dir, fname)
        if (fname in _SKIP_FILES or fname.endswith(_SKIP_SUFFIXES) or fname.startswith(_SKIP_PREFIXES)
                or fname.startswith(".") or not os.path.isfile(p)):
            continue
        shutil.copy2(p, os.path.join(dst_dir, fname))
        copied.append(fname)
    return copied


def sha_warning(ad: Adapter, base: str) -> list[str]:
    """A warning when an ernie-train adapter records a base config.json other than `base`'s."""
    want = ad.config.get("base_model_config_sha256") if ad.kind == "ernie-tools" else None
    if not want:
        return []
    import hashlib
    with open(os.path.join(base, "config.json"), "rb") as f:
        have = hashlib.sha256(f.read()).hexdigest()
    if have != want:
        return [f"{ad.path}: trained on a base whose config.json differs from {base}'s "
                f"(base_model {ad.config.get('base_model')!r}); shapes agree, so merging anyway"]
    return []


def version() -> str:
    """The installed ernie-tools version (merge provenance)."""
    try:
        from importlib.metadata import version as dist_version
        return dist_version("ernie-tools")
    except Exception:  # running from a source tree without an install
        import libernie
        return libernie.__version__
