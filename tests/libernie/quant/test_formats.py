"""Which Linears are quantized, the planned shapes of every layout, and quantization_config round trips."""
import numpy as np
import pytest

from libernie.checkpoint.names import rules
from libernie.config import ernie_tiny
from libernie.errors import CheckpointError
from libernie.quant.formats import QuantResult, describe, planned, quantizable, quantization_config, tensors_for
from libernie.quant.gptq import rtn_quantize
from libernie.quant.fp8 import quantize_fp8


def test_default_targets_and_skip_patterns():
    cfg = ernie_tiny(vocab_size=64)
    cfg.tie_word_embeddings = False
    picked = [r.paddle for r in rules(cfg) if quantizable(r)]
    assert len(picked) == 8 and all(".layers." in n for n in picked)
    assert not any(quantizable(r) for r in rules(cfg) if "embed" in r.paddle or "norm" in r.paddle
                   or r.paddle == "lm_head.weight")
    kept = [r.paddle for r in rules(cfg) if quantizable(r, ("ernie.layers.1.*", "*.o_proj"))]
    assert kept == ["ernie.layers.0.self_attn.qkv_proj.weight", "ernie.layers.0.mlp.up_gate_proj.weight",
                    "ernie.layers.0.mlp.down_proj.weight"]


@pytest.mark.parametrize("method,fmt,gs", [("wint8", "fastdeploy", -1), ("wint4", "fastdeploy", 16),
                                           ("wint8", "compressed-tensors", 16), ("wint4", "compressed-tensors", -1),
                                           ("fp8", "fastdeploy", -1), ("fp8", "compressed-tensors", -1)])
def test_planned_shapes_equal_written_shapes(method, fmt, gs):
    cfg = ernie_tiny(vocab_size=64)
    rule = next(r for r in rules(cfg) if r.paddle.endswith("qkv_proj.weight"))
    n_in, n_out = rule.paddle_shape
    w = np.random.default_rng(0).normal(0, 0.1, (n_out, n_in)).astype(np.float32)
    if method == "fp8":
        codes, s = quantize_fp8(w)
        r = QuantResult("fp8", codes, np.array([s]), np.array([0.5], np.float32))
    else:
        q, s = rtn_quantize(w, 8 if method == "wint8" else 4, gs)
        r = QuantResult(method, q, s, None, gs)
    got = [(n, dt, tuple(a.shape)) for n, a, dt in tensors_for(rule, r, fmt)]
    assert got == [(n, dt, tuple(s)) for n, dt, s in planned(rule, method, fmt, gs)]
    names = [n for n, _, _ in got]
    if fmt == "compressed-tensors":
        assert names[0].startswith("model.layers.0.self_attn.q_proj.") and any(".v_proj." in n for n in names)
    else:
        assert names[0] == "ernie.layers.0.self_attn.qkv_proj.quant_weight"


@pytest.mark.parametrize("method", ["wint8", "wint4", "fp8"])
@pytest.mark.parametrize("fmt", ["fastdeploy", "compressed-tensors"])
def test_config_describes_itself(method, fmt):
    qc = quantization_config(method, fmt, algo="rtn", group_size=-1 if method != "wint4" else 128, skip=[],
                             skipped_hf=[], n_quantized=8, base="b")
    assert describe(qc, "x") == (method, fmt)
    if fmt == "fastdeploy":
        assert qc["is_quantized"] is True
        assert qc["dense_quant_type"] == ("tensor_wise_fp8" if method == "fp8" else method)
    else:
        assert qc["quant_method"] == "compressed-tensors" and "lm_head" in qc["ignore"]


def test_unknown_quantization_config_is_refused():
    with pytest.raises(CheckpointError, match="block_wise_fp8"):
        describe({"dense_quant_type": "block_wise_fp8", "is_quantized": True}, "x")
    with pytest.raises(CheckpointError, match="marlin-24"):
        describe({"quant_method": "compressed-tensors", "format": "marlin-24"}, "x")


def test_compressed_tensors_variants_we_do_not_run_are_refused():
    base = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    with pytest.raises(CheckpointError, match="asymmetric"):
        describe({**base, "config_groups": {"g": {"weights": {"num_bits": 4, "symmetric": False}}}}, "x")
    with pytest.raises(CheckpointError, match="actorder"):
        describe({**base, "config_groups": {"g": {"weights": {"num_bits": 4, "actorder": "group"}}}}, "x")
    assert describe({**base, "config_groups": {"g": {"weights": {"num_bits": 4, "actorder": "static"}}}},
                    "x") == ("wint4", "compressed-tensors")
