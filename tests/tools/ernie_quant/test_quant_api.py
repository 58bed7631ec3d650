"""quantize() end to end on a tiny model: what is on disk is what the docs say, what loads is what is on disk,
and the quantized model computes what dequantized weights compute."""
import json
import os

import numpy as np
import pytest

from libernie.checkpoint import CheckpointReader
from libernie.checkpoint.safetensors_io import to_float32
from libernie.model import ErnieForCausalLM
from libernie.quant.fp8 import decode_e4m3
from libernie.quant.linear import QuantLinear, dequantize_weight
from libernie.quant.packing import unpack_int32

from ernie_quant.api import quantize
from quant_testlib import logits

CASES = [("wint8", "fastdeploy", {}), ("wint4", "fastdeploy", {"group_size": 16}),
         ("fp8", "fastdeploy", {"calib": True}), ("wint8", "compressed-tensors", {}),
         ("wint4", "compressed-tensors", {"group_size": 16}), ("fp8", "compressed-tensors", {"calib": True})]


def run(assets, tmp_path, method, fmt, kw, base="base"):
    kw = dict(kw)
    if kw.pop("calib", False):
        kw["calib"] = str(assets / "calib")
    out = tmp_path / f"{method}-{fmt}"
    return quantize(method, str(assets / base), str(out), fmt=fmt, **kw), out


@pytest.mark.parametrize("method,fmt,kw", CASES)
def test_quantize_writes_the_documented_layout_and_loads_as_stored(assets, tmp_path, method, fmt, kw):
    s, out = run(assets, tmp_path, method, fmt, kw)
    assert s.quantized == 8 and s.kept_float == [] and s.bytes_after < s.bytes_before
    cfg = json.load(open(out / "config.json"))
    qc = cfg["quantization_config"]
    reader = CheckpointReader(out)
    base = ErnieForCausalLM.from_pretrained(assets / "base")
    model = ErnieForCausalLM.from_pretrained(out)
    layer = model.ernie.layers[1].self_attn.qkv_proj
    assert isinstance(layer, QuantLinear)
    w = base.ernie.layers[1].self_attn.qkv_proj.weight.numpy()              # [in, out]
    wq = dequantize_weight(layer).numpy()
    if fmt == "fastdeploy":
        assert reader.layout == "paddle" and cfg["architectures"] == ["Ernie4_5_ForCausalLM"]
        stored, dt = reader.get("ernie.layers.1.self_attn.qkv_proj.quant_weight")
        np.testing.assert_array_equal(np.asarray(stored).view(np.uint8), layer.qweight.view("uint8").numpy()
                                      if method == "fp8" else layer.qweight.numpy().view(np.uint8))
    else:
        assert reader.layout == "hf" and qc["quant_method"] == "compressed-tensors"
        assert "ernie.layers.1.self_attn.qkv_proj.quant_weight" not in reader
    if method == "fp8":
        assert qc.get("dense_quant_type", "tensor_wise_fp8") == "tensor_wise_fp8"
        ws = float(layer.scale.numpy().max())
        assert ws == np.float32(np.abs(w).max() / 448)                      # one scale for the fused tensor
        np.testing.assert_allclose(wq, decode_e4m3(np.asarray(layer.qweight.view("uint8").numpy())) * ws)
        assert float(layer.act_scale.numpy()[0]) > 0 and s.calib["tokens"] > 0
    else:
        bits = 8 if method == "wint8" else 4
        gs = 64 if s.group_size == -1 else s.group_size
        scale = np.repeat(layer.scale.numpy(), gs, axis=0)                  # [in, out]
        assert np.all(np.abs(wq - w) <= scale / 2 + 1e-7)                   # round to nearest: half a step
        qmax = 127 if bits == 8 else 7
        np.testing.assert_allclose(np.abs(w).reshape(-1, gs, w.shape[1]).max(1) / qmax, layer.scale.numpy(),
                                   rtol=1e-6)
    rel = np.linalg.norm(wq - w) / np.linalg.norm(w)
    assert abs(rel - s.layer_error["ernie.layers.1.self_attn.qkv_proj.weight"]) < 1e-5
    # every other parameter is loaded unchanged
    np.testing.assert_array_equal(model.ernie.embed_tokens.weight.numpy(), base.ernie.embed_tokens.weight.numpy())
    np.testing.assert_array_equal(model.ernie.layers[0].input_layernorm.weight.numpy(),
                                  base.ernie.layers[0].input_layernorm.weight.numpy())
    tol = {"wint8": 0.02, "wint4": 0.3, "fp8": 0.15}[method]
    assert np.abs(logits(model) - logits(base)).max() < tol


def test_compressed_tensors_ints_unpack_to_the_same_integers(assets, tmp_path):
    s, out = run(assets, tmp_path, "wint4", "compressed-tensors", {"group_size": 16})
    reader = CheckpointReader(out)
    packed, dt = reader.get("model.layers.0.self_attn.k_proj.weight_packed")
    shape, _ = reader.get("model.layers.0.self_attn.k_proj.weight_shape")
    assert dt == "I32" and list(np.asarray(shape)) == [48, 64]
    q = unpack_int32(np.asarray(packed), 4, 64)                              # [kv, in]
    scale = to_float32(np.asarray(reader.get("model.layers.0.self_attn.k_proj.weight_scale")[0]), "F32")
    assert scale.shape == (48, 4)
    layer = ErnieForCausalLM.from_pretrained(out).ernie.layers[0].self_attn.qkv_proj
    # the k part of the fused runtime weight: columns q..q+kv
    np.testing.assert_allclose(dequantize_weight(layer).numpy()[:, 96:144], (q * np.repeat(scale, 16, 1)).T,
                               rtol=1e-6)


def test_both_formats_compute_the_same(assets, tmp_path):
    _, a = run(assets, tmp_path, "wint8", "fastdeploy", {})
    _, b = run(assets, tmp_path, "wint8", "compressed-tensors", {})
    np.testing.assert_allclose(logits(a), logits(b), rtol=1e-6, atol=1e-6)


def test_hf_bf16_base_and_skip_patterns(assets, tmp_path):
    from quant_testlib import make_model
    make_model(tmp_path / "bf16", layout="hf", dtype="bf16")
    s = quantize("wint8", str(tmp_path / "bf16"), str(tmp_path / "out"), skip=("ernie.layers.0.*", "*.down_proj"))
    assert s.base_layout == "hf" and s.layout == "paddle"
    assert sorted(s.kept_float) == ["ernie.layers.0.mlp.down_proj", "ernie.layers.0.mlp.up_gate_proj",
                                    "ernie.layers.0.self_attn.o_proj", "ernie.layers.0.self_attn.qkv_proj",
                                    "ernie.layers.1.mlp.down_proj"]
    reader = CheckpointReader(tmp_path / "out")
    assert reader.get("ernie.layers.0.self_attn.qkv_proj.weight")[1] == "BF16"     # kept float keeps its dtype
    assert reader.get("ernie.embed_tokens.weight")[1] == "BF16"
    assert "ernie.layers.1.self_attn.qkv_proj.quant_weight" in reader
    model = ErnieForCausalLM.from_pretrained(tmp_path / "out")
    assert not isinstance(model.ernie.layers[0].self_attn.qkv_proj, QuantLinear)
    assert isinstance(model.ernie.layers[1].self_attn.qkv_proj, QuantLinear)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        assert os.path.isfile(tmp_path / "out" / f)


def test_eval_reports_both_perplexities(assets, tmp_path):
    s, _ = run(assets, tmp_path, "wint8", "fastdeploy", {"eval_prefix": str(assets / "heldout"), "eval_samples": 4})
    ev = s.eval
    assert ev["sequences"] == 4 and ev["tokens"] > 0
    assert ev["base_ppl"] > 1 and abs(ev["ppl_delta"] - (ev["quant_ppl"] - ev["base_ppl"])) < 1e-9
    assert abs(ev["ppl_delta_pct"]) < 1.0  # wint8 on a random tiny model barely moves it


def test_shard_budget_is_respected(assets, tmp_path):
    """Shards are planned up front under the budget; only a single tensor larger than it gets a shard alone."""
    from libernie.checkpoint.safetensors_io import SafetensorsFile
    s, out = run(assets, tmp_path, "wint8", "fastdeploy", {"max_shard_size": "100KB"})
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) == s.shards == 3
    for f in files:
        sf = SafetensorsFile(str(out / f))
        total = sum(sf.span(n)[1] for n in sf.names)
        assert total <= 100_000 or len(sf.names) == 1


def test_quantized_model_generates_what_its_dequantized_float_twin_generates(assets, tmp_path):
    """Independent truth: a float model whose Linears hold the dequantized weights (plain nn.Linear)."""
    _, out = run(assets, tmp_path, "wint4", "fastdeploy", {"group_size": 16})
    q = ErnieForCausalLM.from_pretrained(out)
    twin = ErnieForCausalLM.from_pretrained(assets / "base")
    for i in range(2):
        for attr in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.up_gate_proj", "mlp.down_proj"):
            a, b = attr.split(".")
            ql = getattr(getattr(q.ernie.layers[i], a), b)
            getattr(getattr(twin.ernie.layers[i], a), b).weight.set_value(dequantize_weight(ql))
    np.testing.assert_allclose(logits(q), logits(twin), rtol=1e-5, atol=1e-5)
    prompt = [[5, 9, 1, 33, 2, 60]]
    a = q.generate(prompt, max_new_tokens=8, temperature=0.0, eos_token_id=-1)
    b = twin.generate(prompt, max_new_tokens=8, temperature=0.0, eos_token_id=-1)
    assert a == b and len(a[0]) == 8


def test_rtn_ints_ignore_calib_data(assets, tmp_path):
    s, _ = run(assets, tmp_path, "wint8", "fastdeploy", {"calib": True})
    assert s.calib is None and s.algo == "rtn"


@pytest.mark.parametrize("method,kw", [("wint4", {"group_size": 16}), ("fp8", {"calib": True})])
def test_half_precision_load_casts_float_parts_only(assets, tmp_path, method, kw):
    """What a GPU load does (bf16 activations): the quantized storage and its fp32 scales are never cast."""
    _, out = run(assets, tmp_path, method, "fastdeploy", kw)
    a = ErnieForCausalLM.from_pretrained(out)
    b = ErnieForCausalLM.from_pretrained(out, dtype="bf16")
    assert str(b.ernie.embed_tokens.weight.dtype).endswith("bfloat16")
    for la, lb in ((a.ernie.layers[0].mlp.down_proj, b.ernie.layers[0].mlp.down_proj),
                   (a.ernie.layers[1].self_attn.qkv_proj, b.ernie.layers[1].self_attn.qkv_proj)):
        assert lb.qweight.dtype == la.qweight.dtype and lb.scale.dtype == la.scale.dtype
        np.testing.assert_array_equal(lb.qweight.view("uint8").numpy() if method == "fp8" else lb.qweight.numpy(),
                                      la.qweight.view("uint8").numpy() if method == "fp8" else la.qweight.numpy())
        np.testing.assert_array_equal(lb.scale.numpy(), la.scale.numpy())


def test_gptq_is_wired_and_its_integers_are_what_is_stored(assets, tmp_path):
    """--algo gptq runs libernie.quant.gptq_model on the calibration sequences; the file holds its integers."""
    s, out = run(assets, tmp_path, "wint4", "fastdeploy", {"group_size": 16, "algo": "gptq", "calib": True,
                                                             "calib_samples": 8})
    r, _ = run(assets, tmp_path / "rtn", "wint4", "fastdeploy", {"group_size": 16})
    assert s.algo == "gptq" and s.calib["sequences"] == 8
    assert json.load(open(out / "config.json"))["quantization_config"]["ernie_tools"]["algo"] == "gptq"
    g = ErnieForCausalLM.from_pretrained(out).ernie.layers[1].mlp.down_proj
    rt = ErnieForCausalLM.from_pretrained(tmp_path / "rtn" / "wint4-fastdeploy").ernie.layers[1].mlp.down_proj
    assert not np.array_equal(g.qweight.numpy(), rt.qweight.numpy())   # not round to nearest
    assert s.layer_error.keys() == r.layer_error.keys()


@pytest.mark.parametrize("base", ["base", "base-hf"])
def test_streaming_calibration_equals_whole_model_hooks(assets, base, tmp_path):
    from libernie.config import ErnieConfig
    from ernie_quant import data as qd
    path = str(assets / base)
    cfg = ErnieConfig.from_file(path)
    ds = qd.open_dataset(str(assets / "calib"), cfg, path, None, "calibration")
    batches = list(qd.batches(ds, 6))
    modules = [f"ernie.layers.{i}.{m}" for i in range(2) for m in
               ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.up_gate_proj", "mlp.down_proj")]
    whole, t1 = qd.activation_amax(ErnieForCausalLM.from_pretrained(path), batches, modules)
    from ernie_quant.stream import Source
    spill = tmp_path / "spill"
    spill.mkdir()
    streamed, t2 = qd.activation_amax_streaming(Source.open(path), batches, modules, spill_dir=str(spill))
    assert list(spill.iterdir()) == []                  # the hidden states' spill file leaves nothing behind
    assert t1 == t2 > 0
    assert whole.keys() == streamed.keys() and all(v > 0 for v in whole.values())
    for m in modules:
        assert streamed[m] == pytest.approx(whole[m], rel=1e-6), m


@pytest.mark.parametrize("fmt", ["fastdeploy", "compressed-tensors"])
def test_bias_and_untied_head_stay_float_and_load(tmp_path, fmt):
    from quant_testlib import make_model
    base = make_model(tmp_path / "b", layout="hf", tied=False, use_bias=True)
    s = quantize("wint8", str(tmp_path / "b"), str(tmp_path / "q"), fmt=fmt)
    reader = CheckpointReader(tmp_path / "q")
    head = "lm_head.weight"
    assert reader.get(head)[1] == "F32" and s.quantized == 8
    bias = "ernie.layers.0.self_attn.qkv_proj.bias" if fmt == "fastdeploy" else "model.layers.0.self_attn.k_proj.bias"
    assert reader.get(bias)[1] == "F32"
    q = ErnieForCausalLM.from_pretrained(tmp_path / "q")
    np.testing.assert_array_equal(q.ernie.layers[0].self_attn.qkv_proj.bias.numpy(),
                                  base.ernie.layers[0].self_attn.qkv_proj.bias.numpy())
    assert np.abs(logits(q) - logits(base)).max() < 0.02


def test_foreign_compressed_tensors_variants_load(assets, tmp_path):
    """What other writers do: per-channel fp8 weight scales ([out, 1], llm-compressor "channel") and bf16 int
    scales load to the same model; a dynamic-activation fp8 file is refused with one line."""
    import shutil
    from libernie.checkpoint.safetensors_io import SafetensorsFile, from_float32, write_safetensors
    from libernie.errors import CheckpointError
    _, fp8 = run(assets, tmp_path, "fp8", "compressed-tensors", {"calib": True})
    want = logits(fp8)

    def rewrite(d, edit):
        for f in [f for f in os.listdir(d) if f.endswith(".safetensors")]:
            sf = SafetensorsFile(str(d / f))
            tensors = {n: (np.array(sf.get(n)), sf.dtype(n)) for n in sf.names}
            tensors = dict(edit(tensors))
            write_safetensors(str(d / f), tensors, sf.metadata)
        idx = json.load(open(d / "model.safetensors.index.json"))
        names = set().union(*[SafetensorsFile(str(d / f)).names for f in os.listdir(d) if f.endswith(".safetensors")])
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if k in names}
        json.dump(idx, open(d / "model.safetensors.index.json", "w"))

    chan = tmp_path / "chan"
    shutil.copytree(fp8, chan)
    def per_channel(tensors):
        for n, (a, dt) in tensors.items():
            if n.endswith(".weight_scale"):
                w = tensors[n[: -len("_scale")]][0]
                yield n, (np.full((w.shape[0], 1), a.reshape(-1)[0], np.float32), "F32")
            else:
                yield n, (a, dt)
    rewrite(chan, per_channel)
    np.testing.assert_allclose(logits(chan), want, rtol=1e-6, atol=1e-6)

    dyn = tmp_path / "dyn"
    shutil.copytree(fp8, dyn)
    rewrite(dyn, lambda t: ((n, v) for n, v in t.items() if not n.endswith(".input_scale")))
    with pytest.raises(CheckpointError, match="no input_scale"):
        ErnieForCausalLM.from_pretrained(dyn)

    _, w4 = run(assets, tmp_path, "wint4", "compressed-tensors", {"group_size": 16})
    want4 = logits(w4)
    bf = tmp_path / "bf"
    shutil.copytree(w4, bf)
    rewrite(bf, lambda t: ((n, (from_float32(a, "BF16"), "BF16") if n.endswith("weight_scale") else (a, dt))
                           for n, (a, dt) in t.items()))
    assert np.abs(logits(bf) - want4).max() < 0.05     # the scales lost bits to bf16; the integers did not


def test_hidden_spill_gives_back_the_same_bits(tmp_path):
    from ernie_quant.data import HiddenSpill
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, s, 24)).astype(np.float32) for s in (5, 1, 17)]
    xs[1][0, 0, :3] = [np.inf, -0.0, 1e-40]                      # odd values travel as bits
    sp = HiddenSpill(str(tmp_path))
    for x in xs:
        sp.append(x)
    assert len(sp) == 3 and list(tmp_path.iterdir()) == []      # unlinked at creation
    for k, x in enumerate(xs):
        np.testing.assert_array_equal(sp[k].view(np.uint32), x.view(np.uint32))
    sp[2] = xs[2] * 2                                           # a layer's output replaces its input in place
    np.testing.assert_array_equal(sp[2], xs[2] * 2)
    np.testing.assert_array_equal(sp[0], xs[0])                 # neighbours untouched
    np.testing.assert_array_equal(sp[1].view(np.uint32), xs[1].view(np.uint32))
    with pytest.raises(ValueError, match="shape"):
        sp[0] = xs[2]
    sp.close()
