"""QuantLinear: a Linear whose weight stays quantized in memory, behind one dispatch point.

    quant_linear(x, layer)      the dispatch point: GPU kernels when Paddle sees a GPU, else cpu_blocked
    cpu_reference(x, layer)     dequantize per matmul (q * scale; int4 unpacked first), fp8 also
                                fake-quantizes x with the static activation scale: the GPU's numbers
    cpu_blocked(x, layer)       the same product over blocks of input rows: the widened block stays in cache
                                and is never the whole [in, out] matrix (an lm_head is [h, V])
    QuantEmbedding / quant_embedding / vocab_logits
                                a wint8 token embedding [V, h] with one scale per row: the lookup widens only
                                the gathered rows; the tied head runs in vocabulary blocks
    weight_only_layout(...)     the GPU layout conversion (paddle.nn.quant.weight_quantize), runs on CPU

Storage (Paddle orientation, as the fastdeploy layout stores it, docs/formats/quant.md):
    wint8  qweight int8 [in, out]        scale f32 [G, out] (G = 1 per channel)
    wint4  qweight int8 [in/2, out]      two values per byte, low nibble = even input row
    fp8    qweight float8_e4m3fn [in, out]   scale f32 [1, out] (one value repeated, or per column)
           act_scale f32 [1]
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn

from libernie.kernels import on_gpu
from libernie.quant.fp8 import E4M3_MAX

QMAX = {"wint8": 127, "wint4": 7}


class QuantLinear(nn.Layer):
    """Drop-in for nn.Linear(in_features, out_features) with quantized storage; see the module docstring."""

    def __init__(self, method: str, in_features: int, out_features: int, group_size: int,
                 qweight: paddle.Tensor, scale: paddle.Tensor, act_scale: paddle.Tensor | None = None,
                 bias: paddle.Tensor | None = None):
        super().__init__()
        self.method, self.in_features, self.out_features = method, in_features, out_features
        self.group_size = in_features if group_size == -1 else group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("act_scale", act_scale)
        self.bias = bias  # a Parameter or None, as nn.Linear
        self._gpu = None  # (kernel weight, kernel scale) for weight_only_linear, built on first GPU use
        # fp8 GEMMs take one weight scale; a checkpoint whose fused parts have different scales dequantizes instead
        self.tensorwise = method == "fp8" and float(scale.min()) == float(scale.max())

    def forward(self, x):                                       # [..., in] -> [..., out]
        return quant_linear(x, self)

    def extra_repr(self) -> str:
        return f"{self.method}, in={self.in_features}, out={self.out_features}, group={self.group_size}"


class QuantEmbedding(nn.Layer):
    """Drop-in for nn.Embedding(V, h) stored as int8 rows qweight [V, h] and one F32 scale per row [V]
    (docs/formats/quant.md). When the embedding is tied it is also the LM head (per-output-channel scales)."""

    def __init__(self, qweight: paddle.Tensor, scale: paddle.Tensor, dtype="float32"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.out_dtype = str(dtype).split(".")[-1]                # what the lookup returns: the model's dtype
        self.register_buffer("qweight", qweight)                    # int8 [V, h]
        self.register_buffer("scale", scale.reshape([-1]))          # f32 [V]

    def forward(self, ids):                                         # [b, s] -> [b, s, h]
        return quant_embedding(ids, self, self.out_dtype)

    def extra_repr(self) -> str:
        return f"wint8, vocab={self.num_embeddings}, dim={self.embedding_dim}"


def quant_embedding(ids: paddle.Tensor, layer: QuantEmbedding, dtype: str = "float32") -> paddle.Tensor:
    """Gather the rows of `ids` [b, s] and dequantize only them -> [b, s, h]."""
    flat = ids.reshape([-1])
    rows = paddle.gather(layer.qweight, flat).astype(dtype)                        # [b*s, h]
    rows = rows * paddle.gather(layer.scale, flat).astype(dtype).unsqueeze(-1)   # one scale per row
    return rows.reshape([*ids.shape, layer.embedding_dim])


# Head rows widened at a time: 512 x h x 4 bytes = 2 MiB at h = 1024, never [V, h]. Measured (one head over
# V = 103424, h = 1024): 256-512 rows about as fast as the fp32 [V, h] matmul (18-20 ms), 1024-8192 rows
# 165-187 ms; in a whole decode step of the 12-layer bench model 512 rows was 2 ms faster than 384.
VOCAB_BLOCK_ELEMS = 512 * 1024


def vocab_logits(h: paddle.Tensor, weight: paddle.Tensor, scale: paddle.Tensor | None = None,
                 block: int | None = None) -> paddle.Tensor:
    """h [.., hid] @ weight[V, hid]^T (* scale[V]) -> [.., V], widening `block` vocabulary rows at a time.

    For a tied quantized embedding (int8 weight + row scales) or a float one stored narrower than h (bf16);
    the float32 full-precision path stays a single matmul (training needs its gradient)."""
    block = block or max(16, VOCAB_BLOCK_ELEMS // weight.shape[1])
    outs = [paddle.matmul(h, weight[v0:v0 + block].astype(h.dtype), transpose_y=True)      # [.., B] each
            for v0 in range(0, weight.shape[0], block)]
    y = outs[0] if len(outs) == 1 else paddle.concat(outs, axis=-1)                      # [.., V]
    return y * scale.astype(h.dtype) if scale is not None else y                        # per-row scale, once


def quant_linear(x: paddle.Tensor, layer: QuantLinear) -> paddle.Tensor:
    """THE dispatch point for quantized matmuls."""
    if on_gpu():
        return _gpu_linear(x, layer)
    return cpu_blocked(x, layer)


# Weight elements widened at a time on CPU (6 MiB of fp32). One greedy decode step of the 12-layer 0.3B-width
# model (scripts/bench/quant.py's base), in-process, configs alternating, median of 5 (load 2): fp32 52 ms;
# wint8 + quantized embedding with 384K-element blocks 59 ms, 1.5M 50 ms, 6M 93 ms; the whole matrix at once
# (the reference) was 273 ms in an earlier run where fp32 took 59 ms. Fewer, larger blocks also mean fewer
# Paddle ops per step, which matters when the cores are shared.
ROW_BLOCK_ELEMS = 512 * 3072


def warm_allocator() -> None:
    """Allocate and free one float32 tensor twice the largest block, once, so that the per-block float copies
    of cpu_blocked and vocab_logits (up to 6 MiB) come from the heap. glibc serves allocations above its mmap
    threshold (128 KiB at start) with fresh mmap'd pages, page-faulted on every use, and raises the threshold
    to the size of an mmap'd chunk when it is freed (dynamic threshold, up to 32 MiB). Measured, one head over
    a [103424, 1024] int8 embedding in blocks: 96-262 ms before, 19 ms after (the fp32 [V, h] matmul: 20 ms).
    A MALLOC_MMAP_THRESHOLD_ set by the user turns the dynamic threshold off; then this does nothing."""
    buf = paddle.empty([min(8 << 20, 2 * max(ROW_BLOCK_ELEMS, VOCAB_BLOCK_ELEMS))], dtype="float32")
    buf.fill_(0.0)
    del buf


def cpu_blocked(x: paddle.Tensor, layer: QuantLinear) -> paddle.Tensor:
    """cpu_reference summed over blocks of input rows: x[.., k0:k1] @ dequantize(q[k0:k1]). One scale per output
    column (wint8/wint4 per channel, fp8) is applied once to the sum; group scales inside each block (blocks are
    whole groups). Same products; the float32 sums are only regrouped."""
    if layer.method == "fp8":
        x = fake_quant_fp8(x, layer.act_scale)
    n_in, n_out, gs = layer.in_features, layer.out_features, layer.group_size
    grouped = layer.scale.shape[0] > 1
    step = gs * max(1, ROW_BLOCK_ELEMS // (n_out * gs)) if grouped else max(16, ROW_BLOCK_ELEMS // n_out)
    step = min(n_in, step - step % 2)             # even: a wint4 block starts on a whole byte (in, gs are even)
    y = None
    for k0 in range(0, n_in, step):
        k1 = min(k0 + step, n_in)
        if layer.method == "wint4":   # even rows (low nibbles) and odd rows (high) multiply x's even / odd columns
            lo, hi = _nibbles(layer.qweight[k0 // 2:k1 // 2], x.dtype)                 # [(k1 - k0) / 2, out] each
            if grouped:               # gs is even: packed row j is in group (k0 / 2 + j) // (gs / 2), both nibbles
                s = layer.scale[k0 // gs:k1 // gs].astype(x.dtype).unsqueeze(1)          # [g, 1, out]
                shape = [(k1 - k0) // gs, gs // 2, n_out]
                lo = (lo.reshape(shape) * s).reshape([(k1 - k0) // 2, n_out])
                hi = (hi.reshape(shape) * s).reshape([(k1 - k0) // 2, n_out])
            p = paddle.matmul(x[..., k0:k1:2], lo) + paddle.matmul(x[..., k0 + 1:k1:2], hi)  # [.., out]
        else:
            w = layer.qweight[k0:k1].astype(x.dtype)                                     # [k1 - k0, out]
            if grouped:
                s = layer.scale[k0 // gs:k1 // gs].astype(x.dtype).unsqueeze(1)          # [g, 1, out]
                w = (w.reshape([(k1 - k0) // gs, gs, n_out]) * s).reshape([k1 - k0, n_out])
            p = paddle.matmul(x[..., k0:k1], w)                                        # [.., out]
        y = p if y is None else y + p
    if not grouped:
        y = y * layer.scale.astype(x.dtype).reshape([-1])
    return y + layer.bias if layer.bias is not None else y


def _nibbles(p: paddle.Tensor, dtype) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Packed int4 rows [k, out] -> (low, high) nibbles as floats [k, out] each, sign-extended, in float
    arithmetic (exact on these small integers): byte = 16 * hi + (lo mod 16). Paddle's CPU bit shifts + stack
    (unpack_int4) took 2.2-7.8 ms for a [128, 6144] packed block, this 0.84-0.92 ms."""
    pf = p.astype(dtype)
    hi = paddle.floor(pf * 0.0625)                          # the signed high nibble
    lo = pf - 16 * hi                                       # low nibble as unsigned, 0..15
    return lo - 16 * paddle.floor(lo * 0.125), hi           # 8..15 -> -8..-1


def unpack_int4(p: paddle.Tensor) -> paddle.Tensor:
    """[in/2, out] int8, two nibbles per byte -> [in, out] int8 (low nibble = even row), sign-extended."""
    four = paddle.to_tensor(np.int8(4))
    lo = paddle.bitwise_right_shift(paddle.bitwise_left_shift(p, four), four)
    hi = paddle.bitwise_right_shift(p, four)
    return paddle.stack([lo, hi], axis=1).reshape([p.shape[0] * 2, p.shape[1]])   # [in/2, 2, out] -> [in, out]


def dequantize_weight(layer: QuantLinear, dtype: str = "float32") -> paddle.Tensor:
    """The layer's weight as float [in, out]: q * scale per group (what every kernel computes with)."""
    if layer.method == "fp8":
        return layer.qweight.astype(dtype) * layer.scale.astype(dtype)                 # [in, out] * [1, out]
    q = unpack_int4(layer.qweight) if layer.method == "wint4" else layer.qweight   # [in, out] int8
    w = q.astype(dtype)
    g = layer.scale.shape[0]
    if g == 1:
        return w * layer.scale.astype(dtype)                                         # [in, out] * [1, out]
    w = w.reshape([g, layer.group_size, layer.out_features])                         # [G, gs, out]
    return (w * layer.scale.astype(dtype).unsqueeze(1)).reshape([layer.in_features, layer.out_features])


def fake_quant_fp8(x: paddle.Tensor, act_scale: paddle.Tensor) -> paddle.Tensor:
    """x -> e4m3(clip(x / s, ±448)) * s in x's dtype: the activation an fp8 GEMM actually multiplies."""
    s = act_scale.astype(x.dtype)
    xq = paddle.clip(x / s, -E4M3_MAX, E4M3_MAX).astype("float8_e4m3fn")
    return xq.astype(x.dtype) * s


def cpu_reference(x: paddle.Tensor, layer: QuantLinear) -> paddle.Tensor:
    """Plain Paddle: dequantize, (fp8: fake-quantize x), matmul, add bias."""
    if layer.method == "fp8":
        x = fake_quant_fp8(x, layer.act_scale)
    if layer.method == "fp8" or layer.scale.shape[0] == 1:
        # one scale per output column: apply it to the [.., out] result, not to every weight ([in, out]): one
        # pass over the weight (the cast) per matmul instead of two
        q = unpack_int4(layer.qweight) if layer.method == "wint4" else layer.qweight
        y = paddle.matmul(x, q.astype(x.dtype)) * layer.scale.astype(x.dtype).reshape([-1])
    else:
        y = paddle.matmul(x, dequantize_weight(layer, x.dtype))
    return y + layer.bias if layer.bias is not None else y


# ---- GPU (not runnable on this CPU-only machine; the layout conversion below is tested on CPU) -------------
def weight_only_layout(layer: QuantLinear, arch: int, dtype: str = "float16"):
    """(kernel weight, kernel scale) for paddle.nn.quant.weight_only_linear.

    weight_quantize re-derives scales from the dequantized weight; for RTN weights (every group reaches
    ±qmax) that gives back our integers exactly, rearranged for the kernel (tests check this on CPU). GPTQ
    groups that do not reach ±qmax are re-rounded: the GPU then runs within one rounding step of the file.
    """
    w = dequantize_weight(layer, "float32").astype(dtype)                            # [in, out]
    algo = "weight_only_int8" if layer.method == "wint8" else "weight_only_int4"
    gs = -1 if layer.scale.shape[0] == 1 else layer.group_size
    return paddle.nn.quant.weight_quantize(w, algo=algo, arch=arch, group_size=gs)


def _arch() -> int:
    major, minor = paddle.device.cuda.get_device_capability()
    return major * 10 + minor


def _gpu_linear(x: paddle.Tensor, layer: QuantLinear) -> paddle.Tensor:
    if layer.method == "fp8" and not layer.tensorwise:
        return cpu_reference(x, layer)
    if layer.method == "fp8":
        # Paddle's fused fp8 GEMM: x and W in e4m3, one output scale act_scale * weight_scale (tensor-wise).
        xq = paddle.clip(x / layer.act_scale.astype(x.dtype), -E4M3_MAX, E4M3_MAX).astype("float8_e4m3fn")
        w_scale = layer.scale.reshape([-1])[:1]
        y = paddle.linalg.fp8_fp8_half_gemm_fused(
            xq, layer.qweight.T, transpose_x=False, transpose_y=True, bias=layer.bias,
            scale=float((layer.act_scale * w_scale).item()), output_dtype=str(x.dtype).split(".")[-1])
        return y
    if layer._gpu is None:
        arch = _arch()
        layer._gpu = (*weight_only_layout(layer, arch, str(x.dtype).split(".")[-1]), arch)
    wq, ws, arch = layer._gpu
    gs = -1 if layer.scale.shape[0] == 1 else layer.group_size
    return paddle.nn.quant.weight_only_linear(x, wq, bias=layer.bias, weight_scale=ws,
                                             weight_dtype="int8" if layer.method == "wint8" else "int4",
                                             arch=arch, group_size=gs)
