"""QuantLinear: a Linear whose weight stays quantized in memory, behind one dispatch point.

    quant_linear(x, layer)      the dispatch point: GPU kernels when Paddle sees a GPU, else cpu_reference
    cpu_reference(x, layer)     dequantize per matmul (q * scale; int4 unpacked first), fp8 also
                                fake-quantizes x with the static activation scale: the GPU's numbers
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


def quant_linear(x: paddle.Tensor, layer: QuantLinear) -> paddle.Tensor:
    """THE dispatch point for quantized matmuls."""
    if on_gpu():
        return _gpu_linear(x, layer)
    return cpu_reference(x, layer)


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
