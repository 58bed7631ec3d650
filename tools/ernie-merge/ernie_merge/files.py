"""What ernie-merge records beside the weights: provenance (side files and peak memory: libernie)."""
from __future__ import annotations

import os

from ernie_merge.adapters import Adapter


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
