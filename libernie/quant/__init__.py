"""Post-training quantization: weight-only int8/int4 (round-to-nearest and GPTQ) and tensor-wise FP8.

`libernie.quant.gptq` holds the numerics of GPTQ and of the shared integer convention;
`libernie.quant.gptq_model` runs GPTQ over an ErnieForCausalLM layer by layer. See docs/quant-gptq.md.
"""
