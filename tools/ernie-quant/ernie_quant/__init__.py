"""ernie-quant: post-training quantization (wint8, wint4 RTN/GPTQ, tensor-wise fp8) of ERNIE 4.5 checkpoints."""
