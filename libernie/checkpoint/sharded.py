"""Sharded checkpoints: `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`.

CheckpointReader opens a directory (index or single `model.safetensors`) and hands out tensors
one at a time from memory maps. ShardedWriter fills shards up to a byte budget, writes each as
soon as it is full, and names them once the count is known.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager

import numpy as np

from libernie.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from libernie.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, 1000 -> 1000 (bytes)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {size!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


class CheckpointReader:
    """Tensors of a checkpoint directory by name, read lazily. `layout` is 'hf' or 'paddle'."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        index_path, single = os.path.join(self.path, INDEX), os.path.join(self.path, SINGLE)
        if os.path.isfile(index_path):
            try:
                with open(index_path, "rb") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path}: not a valid index (needs a weight_map); regenerate it") from None
        elif os.path.isfile(single):
            weight_map = {n: SINGLE for n in SafetensorsFile(single).names}
        elif os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: no {INDEX} or {SINGLE}; is this a model directory?")
        else:
            raise CheckpointError(f"{self.path}: not found; pass a model directory")
        self.weight_map: dict[str, str] = weight_map
        self._files: dict[str, SafetensorsFile] = {}
        for fname in sorted(set(weight_map.values())):  # open every shard now: fail before any work
            f = self._file(fname)
            missing = [n for n, fn in weight_map.items() if fn == fname and n not in f.names]
            if missing:
                raise CheckpointError(f"{f.path}: index lists {missing[0]} but the file has no such tensor")
        self.layout = detect_layout(list(weight_map), self.path)

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.path, fname))
        return self._files[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> tuple[np.ndarray, str]:
        """(memory-mapped storage array, safetensors dtype) of tensor `name`."""
        f = self._file(self.weight_map[name])
        return f.get(name), f.dtype(name)

    def release(self, name: str) -> None:
        """Drop tensor `name`'s mapped file pages from RSS once it has been copied (SafetensorsFile.release)."""
        self._file(self.weight_map[name]).release(name)

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self.weight_map[name])


def detect_layout(names: list[str], where: str) -> str:
    if any(n.startswith("ernie.") for n in names):
        return "paddle"
    if any(n.startswith("model.") for n in names):
        return "hf"
    raise CheckpointError(f"{where}: tensors have neither the 'ernie.' (Paddle) nor the 'model.' (HF) prefix; "
                          "is this an ERNIE 4.5 checkpoint?")


class ShardedWriter:
    """Add tensors in order; a shard is written when the next tensor would push it past max_bytes."""

    def __init__(self, out_dir: str, max_bytes: int, metadata: dict | None = None):
        self.out_dir, self.max_bytes, self.metadata = out_dir, max_bytes, metadata or {}
        self._pending: dict[str, tuple[np.ndarray, str]] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temp file, names)
        self.total_bytes = 0

    def add(self, name: str, arr: np.ndarray, dtype: str) -> None:
        nbytes = arr.nbytes
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = (arr, dtype)
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        tmp = os.path.join(self.out_dir, f".shard-{len(self._shards):05d}.safetensors")
        self.total_bytes += write_safetensors(tmp, self._pending, self.metadata)
        self._shards.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict:
        """Name the shards model-0000i-of-0000N and write the index. Returns the index dict."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.out_dir, fname))
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        tmp = os.path.join(self.out_dir, INDEX + ".partial")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2)
        os.replace(tmp, os.path.join(self.out_dir, INDEX))
        return index


@contextmanager
def atomic_dir(out_dir: str, overwrite: bool = True):
    """Build a directory under a temp name next to `out_dir`; move it into place only on success."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; choose another path or pass --force")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = tmp + ".old"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
