"""Checkpoint I/O: one loading path for every tool, both ERNIE 4.5 layouts, one tensor at a time.

`iter_tensors(source, cfg, layout)` streams a checkpoint's tensors in the requested layout;
loading, saving and layout conversion are all that generator plus a sink, so no path ever holds
more than one tensor group (q/k/v or gate/up) beyond what the caller keeps.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator

import numpy as np

from libernie.checkpoint.names import FUSED_BIAS, FUSED_LINEAR, Rule, ignorable, rules, to_hf, to_paddle
from libernie.checkpoint.safetensors_io import (SafetensorsFile, drop_pages, from_float32, to_float32,
                                              write_safetensors)
from libernie.checkpoint.sharded import INDEX, CheckpointReader, ShardedWriter, atomic_dir, parse_size
from libernie.config import ErnieConfig
from libernie.errors import CheckpointError

LAYOUTS = ("hf", "paddle")
# safetensors metadata "format": transformers refuses files without "pt"; PaddleFormers writes "np".
FORMAT_TAG = {"hf": "pt", "paddle": "np"}
_DTYPE_TAGS = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16"}
_WEIGHT_FILES = (INDEX, "model.safetensors", "config.json")


def iter_tensors(source, cfg: ErnieConfig, layout: str, release: bool = False) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (name, storage array, safetensors dtype) of every tensor, in `layout`.

    release: once the consumer has taken a tensor (the generator resumes), drop its source's mapped
    pages from RSS (source.release), so reading a checkpoint holds about one tensor resident, not all.

    source: anything with .layout, .keys(), `in`, .get(name) -> (array, dtype), e.g. CheckpointReader.
    Raises CheckpointError naming the first missing, unexpected or mis-shaped tensor.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    table = rules(cfg)
    src = source.layout
    names_of = (lambda r: [r.paddle]) if src == "paddle" else (lambda r: list(r.hf))
    known = {n for r in table for n in names_of(r)}
    where = getattr(source, "path", "checkpoint")
    unexpected = sorted(n for n in source.keys() if n not in known and not ignorable(n, cfg))
    if unexpected:
        hint = ("multi-token-prediction heads, but config.json's num_nextn_predict_layers does not declare them"
                if ".mtp_" in unexpected[0]
                else "check num_hidden_layers, use_bias and tie_word_embeddings")
        raise CheckpointError(f"{where}: {len(unexpected)} tensor(s) config.json does not describe, first "
                              f"{unexpected[0]}; {hint}")
    for rule in table:
        names = names_of(rule)
        shapes = [rule.paddle_shape] if src == "paddle" else rule.hf_shapes()
        arrs, dtypes = [], []
        absent = rule.optional and not any(n in source for n in names)  # e.g. no correction bias: zeros
        for name, shape in zip(names, shapes):
            if absent:
                arrs.append(np.zeros(shape, np.float32))
                dtypes.append("F32")
                continue
            if name not in source:
                raise CheckpointError(f"{where}: missing tensor {name}; the checkpoint is incomplete or "
                                      "config.json does not match it")
            arr, dt = source.get(name)
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"{_file(source, name)}: tensor {name} has shape {list(arr.shape)}, config.json "
                                      f"implies {list(shape)}; config and weights disagree")
            arrs.append(arr)
            dtypes.append(dt)
        if len(set(dtypes)) > 1 and layout != src:
            raise CheckpointError(f"{where}: parts of {rule.paddle} have different dtypes {dtypes}; cannot fuse")
        if layout == src:
            yield from zip(names, arrs, dtypes)
        elif layout == "hf":
            yield from zip(rule.hf, to_hf(rule, arrs[0]), dtypes * len(rule.hf))
        else:
            yield rule.paddle, to_paddle(rule, arrs), dtypes[0]
        if release and not absent and hasattr(source, "release"):
            del arrs
            for name in names:
                source.release(name)


def _file(source, name):
    return source.file_of(name) if hasattr(source, "file_of") else getattr(source, "path", "checkpoint")


def cast(arr: np.ndarray, dtype: str, target: str | None) -> tuple[np.ndarray, str]:
    """Cast a storage array to safetensors dtype `target` (None keeps it)."""
    if target is None or target == dtype:
        return arr, dtype
    return from_float32(to_float32(arr, dtype), target), target


def fp32_names(cfg: ErnieConfig) -> set[str]:
    """Tensor names (both layouts) written as F32 whatever the target dtype: the MoE router and its bias."""
    return {n for r in rules(cfg) if r.fp32 for n in (r.paddle, *r.hf)}


def dtype_tag(dtype: str | None) -> str | None:
    if dtype in (None, "keep"):
        return None
    if dtype not in _DTYPE_TAGS:
        raise ValueError(f"dtype must be keep, fp32, bf16 or fp16, got {dtype!r}")
    return _DTYPE_TAGS[dtype]


# ---- models ----------------------------------------------------------------------------------------
class _ModelSource:
    """A live model seen as a Paddle-layout checkpoint."""
    layout = "paddle"
    path = "model"

    def __init__(self, model):  # LoRA matrices are not part of the base checkpoint (save_adapter writes them)
        self.params = {n: p for n, p in model.named_parameters() if ".lora_" not in n}

    def keys(self):
        return list(self.params)

    def __contains__(self, name):
        return name in self.params

    def get(self, name):
        p = self.params[name]
        if "bfloat16" in str(p.dtype):  # numpy has no bf16: widen exactly, then store the bits
            return from_float32(p.astype("float32").numpy(), "BF16"), "BF16"
        arr = p.numpy()
        tag = {np.float32: "F32", np.float16: "F16"}.get(arr.dtype.type)
        if tag is None:
            raise CheckpointError(f"parameter {name} has dtype {arr.dtype} we cannot save")
        return arr, tag


_BLOCK = 32 << 20  # bytes per block when copying a large tensor out of its mapped file


def _copy_into(param, arr: np.ndarray, dt: str) -> None:
    """param <- arr without a second host copy: F32 straight from the mapped pages, and a large tensor
    (the 424 MB embedding of ERNIE 4.5 0.3B) in row blocks whose pages are dropped as they are copied,
    so loading holds the weights plus ~one block, not the weights plus the checkpoint."""
    import paddle
    if arr.dtype != np.float32:
        arr = to_float32(arr, dt)
    if arr.nbytes <= _BLOCK or arr.ndim == 0 or not arr.flags.c_contiguous:
        param.set_value(arr)
        return
    rows = max(1, _BLOCK // (arr.nbytes // arr.shape[0]))
    with paddle.no_grad():
        for i in range(0, arr.shape[0], rows):
            param[i:i + rows] = paddle.to_tensor(arr[i:i + rows])
            drop_pages(arr[i:i + rows])


def load_model(cls, path, dtype: str | None = None):
    """Build `cls(config)` from a checkpoint directory in either layout, one tensor at a time."""
    from libernie.kernels import on_gpu

    path = os.fspath(path)
    cfg = ErnieConfig.from_file(path)
    if cfg.extra.get("quantization_config") is not None:  # ernie-quant output: weights stay quantized
        from libernie.quant.load import load_quantized
        return load_quantized(cls, path, cfg, dtype=dtype)
    reader = CheckpointReader(path)
    model = cls(cfg)
    params = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
    disk_dtypes = set()
    for name, arr, dt in iter_tensors(reader, cfg, "paddle", release=True):  # peak: weights + ~one tensor
        disk_dtypes.add(dt)
        _copy_into(params.pop(name), np.asarray(arr), dt)
    if params:  # the name table and the model disagree: a bug, not bad input
        raise RuntimeError(f"model parameters not covered by the checkpoint name table: {sorted(params)[:3]}")
    if dtype is None:  # CPU computes in fp32; a GPU keeps the checkpoint's half precision
        dtype = "bfloat16" if on_gpu() and disk_dtypes == {"BF16"} else "float32"
    if dtype not in ("float32", "fp32"):
        model.to(dtype={"bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype))
    model.eval()
    return model


def save_model(model, out_dir, layout: str = "hf", max_shard_size="5GB", dtype: str | None = None) -> dict:
    """Write the model's weights (+ config.json) to `out_dir` in `layout`, replacing it atomically.
    Files already in `out_dir` that are not weights or config (tokenizer, chat template) are kept."""
    cfg = model.config
    target = dtype_tag(dtype)
    out_dir = os.fspath(out_dir)
    with atomic_dir(out_dir) as tmp:
        if os.path.isdir(out_dir):
            _copy_side_files(out_dir, tmp)
        writer = ShardedWriter(tmp, parse_size(max_shard_size), {"format": FORMAT_TAG[layout]})
        pinned = fp32_names(cfg)
        for name, arr, dt in iter_tensors(_ModelSource(model), cfg, layout):
            writer.add(name, *cast(arr, dt, "F32" if name in pinned else target))
        index = writer.close()
        cfg.save(tmp, layout)
    return index


def convert_checkpoint(src, dst, layout: str, max_shard_size="5GB", dtype: str | None = None,
                       overwrite: bool = False) -> dict:
    """Rewrite checkpoint `src` as `dst` in `layout` without building a model, tensor by tensor.
    bf16 stays bf16 unless `dtype` says otherwise. Tokenizer and other side files are copied."""
    cfg = ErnieConfig.from_file(src)
    reader = CheckpointReader(src)
    target = dtype_tag(dtype)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        _copy_side_files(os.fspath(src), tmp)
        writer = ShardedWriter(tmp, parse_size(max_shard_size), {"format": FORMAT_TAG[layout]})
        pinned = fp32_names(cfg)
        for name, arr, dt in iter_tensors(reader, cfg, layout):
            writer.add(name, *cast(arr, dt, "F32" if name in pinned else target))
        index = writer.close()
        cfg.save(tmp, layout)
    return {"src": os.fspath(src), "dst": os.fspath(dst), "src_layout": reader.layout, "layout": layout,
            "tensors": len(index["weight_map"]), "bytes": index["metadata"]["total_size"],
            "shards": len(set(index["weight_map"].values()))}


def _copy_side_files(src_dir: str, dst_dir: str) -> None:
    """Copy tokenizer files, chat template, generation config...: everything but weights and config."""
    for fname in sorted(os.listdir(src_dir)):
        p = os.path.join(src_dir, fname)
        if (fname in _WEIGHT_FILES or fname.endswith((".safetensors", ".partial")) or fname.startswith(".")
                or not os.path.isfile(p)):
            continue
        shutil.copy2(p, os.path.join(dst_dir, fname))


__all__ = ["iter_tensors", "load_model", "save_model", "convert_checkpoint", "CheckpointReader",
           "ShardedWriter", "SafetensorsFile", "write_safetensors", "to_float32", "from_float32",
           "parse_size", "atomic_dir", "Rule", "LAYOUTS", "FUSED_LINEAR", "FUSED_BIAS"]
