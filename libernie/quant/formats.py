"""Quantized checkpoint layouts (docs/formats/quant.md): which Linears are quantized, the tensors each
layout stores for one of them, and config.json's quantization_config. Pure numpy; no Paddle.

A quantized Linear is handled as one Paddle-layout rule (fused qkv_proj / up_gate_proj stay one matrix): its
integers `q [out, in]` and scales `scale [out, G]`, or fp8 codes `[out, in]` and scalar scales, are laid out
per format by `tensors_for`, and read back into the runtime layout by libernie.quant.load.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from libernie.checkpoint.names import FUSED_LINEAR, LINEAR, Rule
from libernie.errors import CheckpointError
from libernie.quant import BITS
from libernie.quant.packing import pack_int4_rows, pack_int32

VERSION = 1
# Linears quantized by default: the decoder layers' projections, wherever they sit (dense MLP, MoE experts and
# shared experts). Norms, biases and MoE router gates never are; embeddings and lm_head only when asked
# (--quantize-embeddings, wint8, one scale per vocabulary row); --skip removes more.
_TARGETS = {"qkv_proj", "o_proj", "up_gate_proj", "down_proj"}
QUANT_MARKERS = (".quant_weight", ".weight_packed")
EMBEDDING, HEAD = "ernie.embed_tokens.weight", "lm_head.weight"


def module_of(rule: Rule) -> str:
    """'ernie.layers.0.self_attn.qkv_proj.weight' -> 'ernie.layers.0.self_attn.qkv_proj'."""
    return rule.paddle[: -len(".weight")]


def is_vocab(rule: Rule) -> bool:
    """The token embedding [V, h] or an untied lm_head [h, V]: quantized only with --quantize-embeddings."""
    return rule.paddle in (EMBEDDING, HEAD)


def linear_shape(rule: Rule) -> tuple[int, int]:
    """(in, out) of the rule seen as a Linear: Paddle's [in, out]; the embedding [V, h] is the head h -> V."""
    if rule.paddle == EMBEDDING:
        return rule.paddle_shape[1], rule.paddle_shape[0]
    return tuple(rule.paddle_shape)


def rule_group(rule: Rule, group_size: int) -> int:
    """The group size `rule` is quantized with: vocabulary matrices are always per row (per output channel)."""
    return -1 if is_vocab(rule) else group_size


def quantizable(rule: Rule, skip: tuple[str, ...] = (), embeddings: bool = False) -> bool:
    """True for a decoder Linear weight not matched by any fnmatch pattern in `skip` (Paddle module names);
    with `embeddings`, also for the token embedding and an untied lm_head."""
    if embeddings and is_vocab(rule):
        return True
    if rule.kind not in (LINEAR, FUSED_LINEAR) or not rule.paddle.endswith(".weight"):
        return False
    mod = module_of(rule)
    if not mod.startswith("ernie.layers.") or mod.rsplit(".", 1)[-1] not in _TARGETS:
        return False
    return not any(fnmatch.fnmatchcase(mod, p) or fnmatch.fnmatchcase(rule.paddle, p) for p in skip)


def hf_module(name: str) -> str:
    return name[: -len(".weight")]


@dataclass
class QuantResult:
    """One quantized Linear, orientation [out, in] over the whole (fused) Paddle tensor."""
    method: str                     # wint8 | wint4 | fp8
    q: np.ndarray | None            # int8 [out, in] (ints) or uint8 e4m3 codes [out, in] (fp8)
    scale: np.ndarray               # float32 [out, G] (ints) or [1] (fp8)
    act_scale: np.ndarray | None = None  # float32 [1] (fp8)
    group_size: int = -1
    qt: np.ndarray | None = None    # the same values in Paddle orientation [in, out], when the writer built them so

    def paddle_q(self) -> np.ndarray:
        return self.qt if self.qt is not None else self.q.T

    def hf_q(self) -> np.ndarray:
        return self.q if self.q is not None else self.qt.T


def tensors_for(rule: Rule, r: QuantResult, fmt: str) -> list[tuple[str, np.ndarray, str]]:
    """(name, array, safetensors dtype) of every tensor `fmt` stores for quantized Linear `rule`."""
    if fmt == "fastdeploy" and rule.paddle == EMBEDDING:   # kept [V, h] (rows = tokens), one scale per row
        return [(module_of(rule) + ".quant_weight", r.hf_q(), "I8"), (module_of(rule) + ".weight_scale",
                                                                      _f32(r.scale[:, 0]), "F32")]
    if fmt == "fastdeploy":
        p = module_of(rule)
        if r.method == "fp8":
            return [(p + ".quant_weight", r.paddle_q(), "F8_E4M3"), (p + ".weight_scale", _f32(r.scale), "F32"),
                    (p + ".activation_scale", _f32(r.act_scale), "F32")]
        qt = r.paddle_q()                                                    # [in, out]
        if r.method == "wint4":
            qt = pack_int4_rows(qt)                                          # [in/2, out]
        scale = r.scale[:, 0] if r.group_size == -1 else r.scale.T           # [out] | [G, out]
        return [(p + ".quant_weight", qt, "I8"), (p + ".weight_scale", _f32(scale), "F32")]
    if fmt != "compressed-tensors":
        raise ValueError(f"format must be fastdeploy or compressed-tensors, got {fmt!r}")
    out, parts, lo = [], rule.split or (linear_shape(rule)[1],), 0
    for name, width in zip(rule.hf, parts):                                 # the HF parts: rows of [out, in]
        m, rows = hf_module(name), slice(lo, lo + width)
        lo += width
        if r.method == "fp8":
            out += [(m + ".weight", r.hf_q()[rows], "F8_E4M3"), (m + ".weight_scale", _f32(r.scale), "F32"),
                    (m + ".input_scale", _f32(r.act_scale), "F32")]
        else:
            q = r.hf_q()[rows]
            out += [(m + ".weight_packed", pack_int32(q, BITS[r.method]), "I32"),
                    (m + ".weight_scale", _f32(r.scale[rows]), "F32"),
                    (m + ".weight_shape", np.array(q.shape, np.int64), "I64")]
    return out


def planned(rule: Rule, method: str, fmt: str, group_size: int) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of the tensors tensors_for will produce, known before any data is read (the
    streaming writer plans its shards from these; a test checks they equal what tensors_for writes)."""
    n_in, n_out = linear_shape(rule)
    g = 1 if group_size == -1 else n_in // group_size
    if fmt == "fastdeploy" and rule.paddle == EMBEDDING:
        return [(module_of(rule) + ".quant_weight", "I8", (n_out, n_in)), (module_of(rule) + ".weight_scale", "F32",
                                                                          (n_out,))]
    if fmt == "fastdeploy":
        p = module_of(rule)
        if method == "fp8":
            return [(p + ".quant_weight", "F8_E4M3", (n_in, n_out)), (p + ".weight_scale", "F32", (1,)),
                    (p + ".activation_scale", "F32", (1,))]
        rows = n_in // 2 if method == "wint4" else n_in
        return [(p + ".quant_weight", "I8", (rows, n_out)),
                (p + ".weight_scale", "F32", (n_out,) if group_size == -1 else (g, n_out))]
    out = []
    for name, width in zip(rule.hf, rule.split or (n_out,)):
        m = hf_module(name)
        if method == "fp8":
            out += [(m + ".weight", "F8_E4M3", (width, n_in)), (m + ".weight_scale", "F32", (1,)),
                    (m + ".input_scale", "F32", (1,))]
        else:
            words = -(-n_in * BITS[method] // 32)
            out += [(m + ".weight_packed", "I32", (width, words)), (m + ".weight_scale", "F32", (width, g)),
                    (m + ".weight_shape", "I64", (2,))]
    return out


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).reshape(np.shape(a) or (1,)))


# ---- config.json ---------------------------------------------------------------------------------
def quantization_config(method: str, fmt: str, *, algo: str, group_size: int, skip: list[str],
                        skipped_hf: list[str], n_quantized: int, base: str, embeddings: bool = False,
                        tied: bool = True) -> dict:
    """config.json `quantization_config` for `fmt` (keys from FastDeploy's loader / compressed-tensors).
    embeddings: the token embedding (and an untied lm_head) are wint8 per row too."""
    ours = {"version": VERSION, "method": method, "format": fmt, "algo": algo,
            "bits": BITS.get(method, 8), "group_size": group_size if method != "fp8" else None,
            "skip": list(skip), "quantized": n_quantized, "base": base, "quantize_embeddings": bool(embeddings)}
    if fmt == "fastdeploy":
        kind = "tensor_wise_fp8" if method == "fp8" else method
        return {"quantization": "mix_quant" if method == "fp8" else method, "dense_quant_type": kind,
                "moe_quant_type": kind, "is_quantized": True, "ernie_tools": ours}
    if method == "fp8":
        args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
        group = {"targets": ["Linear"], "weights": args, "input_activations": dict(args)}
        form = "float-quantized"
    else:
        w = {"num_bits": BITS[method], "type": "int", "symmetric": True, "dynamic": False,
             "strategy": "channel" if group_size == -1 else "group"}
        if group_size != -1:
            w["group_size"] = group_size
        group, form = {"targets": ["Linear"], "weights": w, "input_activations": None}, "pack-quantized"
    groups, ignore = {"group_0": group}, ["lm_head", *skipped_hf]
    if embeddings:
        # exact names outrank class names in compressed-tensors' matching, so "lm_head" here beats group_0's
        # "Linear"; a tied head is not a module of its own in the file (transformers ties it on load)
        w8 = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "channel"}
        groups["group_1"] = {"targets": ["Embedding"] + ([] if tied else ["lm_head"]), "weights": w8,
                             "input_activations": None}
        if not tied:
            ignore = ignore[1:]
    return {"quant_method": "compressed-tensors", "format": form, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "ernie_tools": ours}


def describe(qc: dict, where: str) -> tuple[str, str]:
    """(method, format) of a quantization_config we can load; CheckpointError otherwise."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is not an object")
    ours = qc.get("ernie_tools") or {}
    if qc.get("quant_method") == "compressed-tensors":
        form = qc.get("format")
        if form == "float-quantized":
            return "fp8", "compressed-tensors"
        if form == "pack-quantized":
            groups = list((qc.get("config_groups") or {}).values())
            w = (groups[0].get("weights") or {}) if groups else {}
            if w.get("symmetric") is False:
                raise CheckpointError(f"{where}: asymmetric (zero-point) pack-quantized weights are not supported; "
                                      "libernie runs symmetric int4/int8")
            if w.get("actorder") == "group":
                raise CheckpointError(f"{where}: actorder 'group' (weight_g_idx) is not supported; quantize with "
                                      "static or no activation ordering")
            if w.get("num_bits") in (4, 8):
                return f"wint{w['num_bits']}", "compressed-tensors"
        raise CheckpointError(f"{where}: compressed-tensors format {form!r} is not one libernie runs; "
                              "it loads float-quantized fp8 and pack-quantized 4/8-bit")
    kind = qc.get("dense_quant_type") or qc.get("quantization")
    if kind == "tensor_wise_fp8":
        return "fp8", "fastdeploy"
    if kind in ("wint8", "wint4") and qc.get("is_quantized", ours != {}):
        return kind, "fastdeploy"
    raise CheckpointError(f"{where}: quantization_config {kind!r} is not a format libernie runs "
                          "(fastdeploy wint8/wint4/tensor_wise_fp8, compressed-tensors)")
