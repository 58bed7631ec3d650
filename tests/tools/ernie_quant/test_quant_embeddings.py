"""ernie-quant wint8 --quantize-embeddings end to end: on disk as docs/formats/quant.md says, the stored
integers are the per-row RTN of the base embedding, the model loads them as stored, and it computes what the
float model computes with the dequantized matrices in place (the reference). Bad combinations: one line."""
import json
import os

import numpy as np
import paddle
import pytest
from click.testing import CliRunner

from libernie.checkpoint import CheckpointReader
from libernie.checkpoint.safetensors_io import to_float32
from libernie.model import ErnieForCausalLM
from libernie.quant.gptq import rtn_quantize_reference
from libernie.quant.linear import QuantEmbedding, QuantLinear, dequantize_weight

from ernie_quant.api import quantize
from ernie_quant.cli import cli
from quant_testlib import IDS, logits, make_model
from test_quant_errors import check_error


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("untied") / "base"
    make_model(path, layout="hf", tied=False, use_bias=True)
    return path


def reference(base, qmodel) -> np.ndarray:
    """The float base with every quantized matrix replaced by its dequantized values: the independent twin."""
    ref = ErnieForCausalLM.from_pretrained(base)
    params = dict(ref.named_parameters())
    for name, sub in qmodel.named_sublayers():
        if isinstance(sub, QuantLinear):
            params[name + ".weight"].set_value(dequantize_weight(sub))
        elif isinstance(sub, QuantEmbedding):
            params[name + ".weight"].set_value(sub.qweight.astype("float32") * sub.scale.unsqueeze(-1))
    return logits(ref)


@pytest.mark.parametrize("base", ["base", "base-hf", "untied"])
def test_embedding_stored_as_per_row_rtn_and_logits_equal_the_dequantized_twin(assets, untied, tmp_path, base):
    src = untied if base == "untied" else assets / base
    out = tmp_path / "w8e"
    s = quantize("wint8", str(src), str(out), quantize_embeddings=True)
    default = quantize("wint8", str(src), str(tmp_path / "w8"))
    assert s.quantize_embeddings and s.quantized == default.quantized + (2 if base == "untied" else 1)
    assert s.bytes_after < default.bytes_after
    reader = CheckpointReader(out)
    assert reader.layout == "paddle"
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["ernie_tools"]["quantize_embeddings"] is True and qc["quantization"] == "wint8"
    base_model = ErnieForCausalLM.from_pretrained(src)
    emb = base_model.ernie.embed_tokens.weight.numpy()                                   # [V, h]
    q, dt = reader.get("ernie.embed_tokens.quant_weight")
    scale, sdt = reader.get("ernie.embed_tokens.weight_scale")
    want_q, want_s = rtn_quantize_reference(emb, 8, -1)
    assert (dt, sdt) == ("I8", "F32") and q.shape == emb.shape
    np.testing.assert_array_equal(np.asarray(q), want_q)
    np.testing.assert_array_equal(to_float32(np.asarray(scale), sdt), want_s[:, 0])
    assert "ernie.embed_tokens.weight" not in reader
    model = ErnieForCausalLM.from_pretrained(out)
    assert isinstance(model.ernie.embed_tokens, QuantEmbedding)
    np.testing.assert_array_equal(model.ernie.embed_tokens.qweight.numpy(), want_q)      # kept as stored
    if base == "untied":
        assert isinstance(model.lm_head, QuantLinear) and "lm_head.quant_weight" in reader
        assert model.lm_head.qweight.shape == [base_model.config.hidden_size, base_model.config.vocab_size]
    got = logits(model)
    np.testing.assert_allclose(got, reference(src, model), rtol=1e-4, atol=1e-4)
    rel = np.abs(got - logits(base_model)).max() / np.abs(logits(base_model)).max()
    assert rel < 0.05                                                                     # and close to the base


def test_generate_with_a_quantized_embedding_equals_the_twin(assets, tmp_path):
    out = tmp_path / "w8e"
    quantize("wint8", str(assets / "base"), str(out), quantize_embeddings=True)
    model = ErnieForCausalLM.from_pretrained(out)
    ref = ErnieForCausalLM.from_pretrained(assets / "base")
    params = dict(ref.named_parameters())
    for name, sub in model.named_sublayers():
        if isinstance(sub, QuantLinear):
            params[name + ".weight"].set_value(dequantize_weight(sub))
    params["ernie.embed_tokens.weight"].set_value(model.ernie.embed_tokens.qweight.astype("float32")
                                                  * model.ernie.embed_tokens.scale.unsqueeze(-1))
    a = model.generate([IDS[0][:6]], max_new_tokens=12, temperature=0.0)
    b = ref.generate([IDS[0][:6]], max_new_tokens=12, temperature=0.0)
    assert a == b and len(a[0]) == 12


def test_cli_flag_and_eval_report(assets, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["wint8", "-q", "--quantize-embeddings", "--model", str(assets / "base"),
                                   "-o", str(out), "--eval", str(assets / "heldout"), "--eval-samples", "4"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["quantize_embeddings"] is True and s["config"]["quantize_embeddings"] is True
    assert "ernie.embed_tokens.weight" in s["layer_error"] and 0 < s["layer_error"]["ernie.embed_tokens.weight"] < 0.02
    assert s["eval"]["quant_ppl"] > 0 and abs(s["eval"]["ppl_delta_pct"]) < 5


@pytest.mark.parametrize("args,needle", [
    (["fp8", "--calib", "CALIB"], "--quantize-embeddings works with wint8 only"),
    (["wint4"], "--quantize-embeddings works with wint8 only"),
    (["wint8", "--format", "compressed-tensors"], "--quantize-embeddings is fastdeploy-only"),
])
def test_combinations_that_cannot_are_refused_in_one_line(assets, tmp_path, args, needle):
    out = str(tmp_path / "o")
    args = [str(assets / "calib") if a == "CALIB" else a for a in args]
    res = CliRunner().invoke(cli, [*args, "--quantize-embeddings", "--model", str(assets / "base"), "-o", out])
    check_error(res, out, needle)


def test_gptq_leaves_the_vocabulary_matrices_to_per_row_rtn(assets, untied, tmp_path):
    out = tmp_path / "g8e"
    s = quantize("wint8", str(untied), str(out), algo="gptq", calib=str(assets / "calib"), calib_samples=8,
                 quantize_embeddings=True)
    assert s.algo == "gptq" and s.quantized == 8 + 2
    reader = CheckpointReader(out)
    base = ErnieForCausalLM.from_pretrained(untied)
    head = base.lm_head.weight.numpy().T                                               # [V, h] = [out, in]
    q, _ = reader.get("lm_head.quant_weight")                                          # [h, V]
    np.testing.assert_array_equal(np.asarray(q).T, rtn_quantize_reference(head, 8, -1)[0])
    q, _ = reader.get("ernie.embed_tokens.quant_weight")
    emb = base.ernie.embed_tokens.weight.numpy()
    np.testing.assert_array_equal(np.asarray(q), rtn_quantize_reference(emb, 8, -1)[0])
    model = ErnieForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(logits(model), reference(untied, model), rtol=1e-4, atol=1e-4)
