"""`PREFIX.json`, the manifest of a packed dataset (docs/formats/shards.md). Written last, atomically."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from libernie.errors import ShardFormatError

FORMAT, VERSION = "ernie-pack", 1


def manifest_path(prefix: str | os.PathLike) -> Path:
    """`out/train` -> `out/train.json`; a path already ending in `.json` is kept."""
    p = Path(prefix)
    return p if p.suffix == ".json" else p.with_name(p.name + ".json")


@dataclass
class Manifest:
    """What a dataset holds. `shards` entries are ShardInfo.to_json() dicts with paths relative to the manifest."""

    mode: str
    seq_len: int
    dtype: str
    tokenizer: dict
    counts: dict
    packing_efficiency: float
    skipped: dict
    options: dict
    split: str | None = None
    shards: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **self.__dict__}

    def write(self, prefix: str | os.PathLike) -> Path:
        """Write `PREFIX.json` via a temp name and rename, so it appears complete or not at all."""
        path = manifest_path(prefix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, prefix: str | os.PathLike) -> "Manifest":
        """Load and check a manifest; raises ShardFormatError with the path and a hint."""
        path = manifest_path(prefix)
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise ShardFormatError(f"{path}: no such manifest; did ernie-pack finish writing PREFIX?") from None
        except orjson.JSONDecodeError as e:
            raise ShardFormatError(f"{path}: not JSON ({e}); repack or restore the manifest") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ShardFormatError(f"{path}: not an ernie-pack manifest (format {data.get('format')!r})"
                                   if isinstance(data, dict) else f"{path}: not an ernie-pack manifest")
        if data.get("version") != VERSION:
            raise ShardFormatError(f"{path}: manifest version {data.get('version')}, this reader knows {VERSION}; "
                                   "upgrade ernie-tools or repack")
        keys = [k for k in cls.__dataclass_fields__]
        missing = [k for k in keys if k not in data and k not in ("split", "shards")]
        if missing:
            raise ShardFormatError(f"{path}: manifest lacks {', '.join(missing)}; repack")
        return cls(**{k: data[k] for k in keys if k in data})
