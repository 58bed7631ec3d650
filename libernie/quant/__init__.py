"""Post-training quantization: the number formats, the checkpoint layouts and the runtime layer.

    packing   int4 nibbles (Paddle layout) and compressed-tensors int32 words
    fp8       e4m3fn encode/decode in numpy, tensor-wise scales
    formats   which Linears are quantized, tensor names per layout, quantization_config
    linear    QuantLinear and its one dispatch point (CPU reference / GPU kernels)
    load      ErnieForCausalLM from a quantized checkpoint, weights kept as stored
    gptq      rtn_quantize, gptq_quantize: the integer rounding rules (numerics)
    gptq_model  GPTQ over an ErnieForCausalLM, layer by layer

Layouts: docs/formats/quant.md. Integer convention everywhere: W viewed as [out, in], symmetric,
groups of `group_size` input columns (-1: one group per row), int8 storage, F32 scales.
"""
from __future__ import annotations

METHODS = ("wint8", "wint4", "fp8")
BITS = {"wint8": 8, "wint4": 4}
DEFAULT_GROUP = {"wint8": -1, "wint4": 128}
FORMATS = ("fastdeploy", "compressed-tensors")
