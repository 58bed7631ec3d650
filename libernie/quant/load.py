"""Build ErnieForCausalLM from a quantized checkpoint (either layout of docs/formats/quant.md).

The model is built under paddle.LazyGuard, so no float weight of a quantized Linear is ever allocated; each
quantized Linear is replaced by a QuantLinear holding the stored integers / fp8 codes (orientation and packing
converted to the runtime's, values untouched), and every other tensor loads as in libernie.checkpoint.
"""
from __future__ import annotations

import os

import numpy as np
import paddle

from libernie.checkpoint.names import FUSED_LINEAR, LINEAR, ignorable, rules, to_paddle
from libernie.checkpoint.safetensors_io import to_float32
from libernie.checkpoint.sharded import CheckpointReader
from libernie.config import ErnieConfig
from libernie.errors import CheckpointError
from libernie.kernels import on_gpu
from libernie.quant import BITS
from libernie.quant.formats import EMBEDDING, describe, hf_module, module_of
from libernie.quant.linear import QuantEmbedding, QuantLinear, warm_allocator
from libernie.quant.packing import pack_int4_rows, unpack_int32


def is_quantized(cfg: ErnieConfig) -> bool:
    return cfg.extra.get("quantization_config") is not None


def load_quantized(cls, path, cfg: ErnieConfig, dtype: str | None = None):
    """cls(cfg) with QuantLinear layers, weights from quantized checkpoint `path`. dtype: compute dtype of the
    float parameters (None/fp32 on CPU)."""
    path = os.fspath(path)
    method, fmt = describe(cfg.extra["quantization_config"], os.path.join(path, "config.json"))
    reader = CheckpointReader(path)
    with paddle.LazyGuard():
        model = cls(cfg)
    layers = {"": model, **dict(model.named_sublayers())}    # "": the root, parent of an untied lm_head
    params = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
    used: set[str] = set()
    quantized = {}
    for rule in rules(cfg):
        got = _read_quantized(reader, rule, method, fmt, used)
        if got is None:
            params.pop(rule.paddle).set_value(read_float(reader, rule, used))
        else:
            params.pop(rule.paddle)
            quantized[rule] = got
    if params:
        raise RuntimeError(f"parameters not covered by the checkpoint name table: {sorted(params)[:3]}")
    extra = sorted(n for n in reader.keys() if n not in used and not ignorable(n, cfg))
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} tensor(s) the quantized model does not use, first {extra[0]}; "
                              "config.json and the weights disagree")
    if not quantized:
        raise CheckpointError(f"{path}: config.json declares {method} but no tensor is quantized; regenerate it")
    # Swap each quantized Linear for a holder of its bias alone (its float weight, never materialized, goes), cast
    # the float parts if asked (Layer.to casts every buffer in place, so the quantized storage must not be in the
    # model yet), then put the QuantLinears in.
    holders = {}
    for rule in quantized:
        if rule.paddle == EMBEDDING:  # its float weight, never materialized, goes before any cast
            model.ernie.embed_tokens = paddle.nn.Layer()
            continue
        mod = module_of(rule)
        parent_name, _, attr = mod.rpartition(".")
        holder = paddle.nn.Layer()
        holder.bias = getattr(layers[mod], "bias", None)
        setattr(layers[parent_name], attr, holder)
        holders[rule] = (layers[parent_name], attr, holder)
    if dtype is None and on_gpu():  # the GPU kernels take half-precision activations
        dtype = "bfloat16"
    if dtype not in (None, "float32", "fp32"):
        model.to(dtype={"bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype))
    for rule, got in quantized.items():
        if rule.paddle == EMBEDDING:  # the lookup (and a tied head) over int8 rows, one scale per row
            model.ernie.embed_tokens = QuantEmbedding(got["qweight"], got["scale"],
                                                      dtype=model.ernie.norm.weight.dtype)
            continue
        parent, attr, holder = holders[rule]
        n_in, n_out = rule.paddle_shape
        setattr(parent, attr, QuantLinear(method, n_in, n_out, got["group_size"], got["qweight"], got["scale"],
                                          got.get("act_scale"), bias=holder.bias))
    if not on_gpu():
        warm_allocator()
    model.eval()
    return model


def _get(reader: CheckpointReader, name: str, used: set) -> tuple[np.ndarray, str]:
    if name not in reader:
        raise CheckpointError(f"{reader.path}: missing tensor {name}; the quantized checkpoint is incomplete")
    used.add(name)
    return reader.get(name)


def read_float(reader, rule, used: set) -> np.ndarray:
    """A float tensor in Paddle orientation, float32."""
    names = [rule.paddle] if reader.layout == "paddle" else list(rule.hf)
    parts = []
    for n, shape in zip(names, [rule.paddle_shape] if reader.layout == "paddle" else rule.hf_shapes()):
        arr, dt = _get(reader, n, used)
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{reader.file_of(n)}: tensor {n} has shape {list(arr.shape)}, config.json "
                                  f"implies {list(shape)}")
        parts.append(to_float32(np.asarray(arr), dt))
    return parts[0] if reader.layout == "paddle" else to_paddle(rule, parts)


def _read_quantized(reader, rule, method, fmt, used) -> dict | None:
    """The runtime tensors of quantized Linear `rule`, or None when the checkpoint stores it in float."""
    if rule.paddle == EMBEDDING:
        return _read_embedding(reader, rule, method, fmt, used)
    if rule.kind not in (LINEAR, FUSED_LINEAR):
        return None
    n_in, n_out = rule.paddle_shape
    if reader.layout == "paddle":
        p = module_of(rule)
        if p + ".quant_weight" not in reader:
            return None
        qw, dt = _get(reader, p + ".quant_weight", used)
        scale = _f32(reader, p + ".weight_scale", used)
        if method == "fp8":
            _expect(reader, p + ".quant_weight", qw, (n_in, n_out), dt, "F8_E4M3")
            act = _f32(reader, p + ".activation_scale", used).reshape([1])
            return _fp8(np.asarray(qw), scale.reshape([-1])[:1].repeat(n_out), act)
        rows = n_in // 2 if method == "wint4" else n_in
        _expect(reader, p + ".quant_weight", qw, (rows, n_out), dt, "I8")
        scale = scale.reshape(1, n_out) if scale.ndim == 1 else scale                 # [G, out]
        return _ints(np.asarray(qw), scale, n_in, reader.file_of(p + ".weight_scale"))
    # HF layout (compressed-tensors): gather the parts, then fuse as the Paddle tensor is fused
    mods = [hf_module(n) for n in rule.hf]
    if method == "fp8":
        if any(reader.get(m + ".weight")[1] != "F8_E4M3" for m in mods if m + ".weight" in reader) \
                or mods[0] + ".weight" not in reader or reader.get(mods[0] + ".weight")[1] != "F8_E4M3":
            return None
        codes, scales, acts = [], [], []
        for m, width in zip(mods, rule.split or (n_out,)):
            w, dt = _get(reader, m + ".weight", used)
            _expect(reader, m + ".weight", w, (width, n_in), dt, "F8_E4M3")
            codes.append(np.asarray(w))
            s = _f32(reader, m + ".weight_scale", used).reshape(-1)
            if s.size not in (1, width):    # tensor-wise [1], or per channel [out, 1] (llm-compressor "channel")
                raise CheckpointError(f"{reader.file_of(m + '.weight_scale')}: {m}.weight_scale has {s.size} values; "
                                      f"libernie runs tensor-wise or per-channel fp8 weight scales")
            scales.append(np.broadcast_to(s, (width,)).astype(np.float32))
            if m + ".input_scale" not in reader:
                raise CheckpointError(f"{reader.path}: {m} has no input_scale; libernie runs fp8 with static "
                                      "activation scales only (dynamic ones are not supported)")
            a = _f32(reader, m + ".input_scale", used).reshape(-1)
            if a.size != 1:
                raise CheckpointError(f"{reader.file_of(m + '.input_scale')}: {m}.input_scale has {a.size} values; "
                                      "libernie runs one static activation scale per Linear")
            acts.append(float(a[0]))
        # the parts see the same input; a writer that gave them different scales gets the largest (no clipping)
        return _fp8(np.concatenate(codes, 0).T, np.concatenate(scales), np.array([max(acts)], np.float32))
    if mods[0] + ".weight_packed" not in reader:
        return None
    bits, qs, ss = BITS[method], [], []
    for m, width in zip(mods, rule.split or (n_out,)):
        packed, dt = _get(reader, m + ".weight_packed", used)
        if dt != "I32":
            raise CheckpointError(f"{reader.file_of(m + '.weight_packed')}: {m}.weight_packed is {dt}, expected I32")
        shape = _get(reader, m + ".weight_shape", used)[0] if m + ".weight_shape" in reader else None
        if shape is not None and [int(v) for v in np.asarray(shape)] != [width, n_in]:
            raise CheckpointError(f"{reader.file_of(m + '.weight_shape')}: {m}.weight_shape is "
                                  f"{[int(v) for v in np.asarray(shape)]}, config.json implies {[width, n_in]}")
        qs.append(unpack_int32(np.asarray(packed), bits, n_in))                     # [width, in] int8
        ss.append(_f32(reader, m + ".weight_scale", used))                         # [width, G], any float dtype
    q = np.concatenate(qs, 0).T                                                      # [in, out]
    if method == "wint4":
        q = pack_int4_rows(np.ascontiguousarray(q))
    return _ints(np.ascontiguousarray(q), np.concatenate(ss, 0).T, n_in, reader.file_of(mods[0] + ".weight_scale"))


def _read_embedding(reader, rule, method, fmt, used) -> dict | None:
    """A wint8 token embedding: int8 [V, h] and one scale per row [V] (either layout), or None if float."""
    v, h = rule.paddle_shape
    if reader.layout == "paddle":
        p = module_of(rule)
        if p + ".quant_weight" not in reader:
            return None
        qw, dt = _get(reader, p + ".quant_weight", used)
        _expect(reader, p + ".quant_weight", qw, (v, h), dt, "I8")
        q = np.asarray(qw)
        scale = _f32(reader, p + ".weight_scale", used).reshape(-1)
    else:
        m = hf_module(rule.hf[0])
        if m + ".weight_packed" not in reader:
            return None
        packed, dt = _get(reader, m + ".weight_packed", used)
        if method != "wint8" or dt != "I32":
            raise CheckpointError(f"{reader.file_of(m + '.weight_packed')}: {m} is {dt} {method}; libernie runs a "
                                  "quantized embedding as 8-bit integers with one scale per row")
        if m + ".weight_shape" in reader:
            shape = [int(x) for x in np.asarray(_get(reader, m + ".weight_shape", used)[0])]
            if shape != [v, h]:
                raise CheckpointError(f"{reader.file_of(m + '.weight_shape')}: {m}.weight_shape is {shape}, "
                                      f"config.json implies {[v, h]}")
        q = unpack_int32(np.asarray(packed), 8, h)                                   # [V, h] int8
        scale = _f32(reader, m + ".weight_scale", used).reshape(-1)
    if scale.size != v:
        raise CheckpointError(f"{reader.path}: the quantized embedding has {scale.size} scales for {v} rows; "
                              "libernie runs one scale per vocabulary row")
    return {"qweight": paddle.to_tensor(np.ascontiguousarray(q)), "scale": paddle.to_tensor(scale), "group_size": -1}


def _f32(reader, name, used) -> np.ndarray:
    arr, dt = _get(reader, name, used)
    return to_float32(np.asarray(arr), dt)


def _expect(reader, name, arr, shape, dt, want_dt):
    if dt != want_dt or tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{reader.file_of(name)}: tensor {name} is {dt} {list(arr.shape)}, expected "
                              f"{want_dt} {list(shape)}; was it written by ernie-quant with this config?")


def _ints(q: np.ndarray, scale: np.ndarray, n_in: int, where: str) -> dict:
    g = scale.shape[0]
    if g < 1 or n_in % g:
        raise CheckpointError(f"{where}: {g} scale groups do not divide the input width {n_in}")
    return {"qweight": paddle.to_tensor(np.ascontiguousarray(q)),
            "scale": paddle.to_tensor(np.ascontiguousarray(scale, dtype=np.float32)), "group_size": n_in // g}


def _fp8(codes: np.ndarray, col_scale: np.ndarray, act: np.ndarray) -> dict:
    """codes uint8 [in, out]; col_scale [out] (all equal when tensor-wise)."""
    q = paddle.to_tensor(np.ascontiguousarray(codes, dtype=np.uint8)).view("float8_e4m3fn")
    return {"qweight": q, "scale": paddle.to_tensor(col_scale.reshape(1, -1).astype(np.float32)),
            "act_scale": paddle.to_tensor(act.astype(np.float32)), "group_size": -1}
