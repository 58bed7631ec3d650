"""merge(): the merged model computes what base + adapter computes (libernie's unmerged LoRA layers are the truth),
in both layouts, tied and untied, fp32 and bf16; files, config and provenance come out right."""
import json

import numpy as np
import paddle
import pytest
from merge_testlib import IDS, SIDE_FILES, logits, make_adapter, make_base, write_json, write_safetensors_np
from safetensors import safe_open

from ernie_merge.merge import merge
from libernie.checkpoint import CheckpointReader, convert_checkpoint, iter_tensors
from libernie.model import ErnieForCausalLM


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("src,dst", [("hf", "hf"), ("hf", "paddle"), ("paddle", "hf"), ("paddle", "paddle")])
def test_merged_logits_equal_base_plus_adapter_fp32(tmp_path, tied, src, dst):
    model = make_base(tmp_path / "base", tied=tied, layout=src)
    base_logits = logits(model)
    targets = ("qkv_proj", "o_proj", "up_gate_proj", "down_proj") + (() if tied else ("lm_head",))
    make_adapter(model, tmp_path / "ad", tmp_path / "base", targets=targets, rslora=not tied)
    adapted = logits(model)  # x W + s (x A) B, never merged
    s = merge(tmp_path / "base", tmp_path / "ad", tmp_path / "out", layout=dst, max_shard_size="30KB")
    merged = logits(tmp_path / "out")
    assert np.abs(adapted - base_logits).max() > 1e-2  # the adapter matters, so equality below means something
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)
    assert (s.layout, s.base_layout, s.untied, s.adapter_format) == (dst, src, False, "ernie-tools")
    assert s.tensors_merged == 2 * 4 + (0 if tied else 1)
    assert CheckpointReader(tmp_path / "out").layout == dst and s.shards > 1


def _bits_bf16(x32: np.ndarray) -> np.ndarray:
    return paddle.to_tensor(x32).astype("bfloat16").numpy()  # paddle's own rounding, not libernie's


@pytest.mark.parametrize("src,dst", [("paddle", "paddle"), ("hf", "hf"), ("hf", "paddle")])
def test_bf16_base_is_merged_in_fp32_and_rounded_once(tmp_path, src, dst):
    make_base(tmp_path / "base", tied=False, layout=src, dtype="bf16")
    model = ErnieForCausalLM.from_pretrained(tmp_path / "base")  # bf16 widened exactly to fp32
    make_adapter(model, tmp_path / "ad", tmp_path / "base", targets=("qkv_proj", "down_proj", "lm_head"))
    s = merge(tmp_path / "base", tmp_path / "ad", tmp_path / "out", layout=dst)
    cfg = model.config
    base = dict((n, (a, d)) for n, a, d in iter_tensors(CheckpointReader(tmp_path / "base"), cfg, "paddle"))
    out = dict((n, (a, d)) for n, a, d in iter_tensors(CheckpointReader(tmp_path / "out"), cfg, "paddle"))
    layers = {n: l for n, l in model.named_sublayers() if hasattr(l, "lora_A")}
    assert s.tensors_merged == len(layers) == 5 and sorted(out) == sorted(base)
    for name, (got, dt) in out.items():
        assert dt == "BF16"
        module = name[: -len(".weight")]
        if module in layers:
            w = layers[module].weight.numpy() + layers[module].delta().numpy()
            np.testing.assert_array_equal(got, _bits_bf16(w), err_msg=name)
        else:  # untouched tensors are the same bits
            np.testing.assert_array_equal(got, base[name][0], err_msg=name)
    # --dtype fp32 keeps the un-rounded sum
    merge(tmp_path / "base", tmp_path / "ad", tmp_path / "out32", layout=dst, dtype="fp32")
    np.testing.assert_allclose(logits(tmp_path / "out32"), logits(model), atol=1e-5, rtol=0)


def test_without_adapter_it_converts_like_libernie(tmp_path):
    make_base(tmp_path / "base", tied=True, layout="hf", dtype="bf16")
    s = merge(tmp_path / "base", None, tmp_path / "out", layout="paddle", max_shard_size="25KB")
    convert_checkpoint(tmp_path / "base", tmp_path / "ref", layout="paddle")
    got, ref = CheckpointReader(tmp_path / "out"), CheckpointReader(tmp_path / "ref")
    assert sorted(got.keys()) == sorted(ref.keys()) and s.tensors_merged == 0 and s.adapter is None
    for n in ref.keys():
        assert got.get(n)[1] == ref.get(n)[1] == "BF16"
        np.testing.assert_array_equal(got.get(n)[0], ref.get(n)[0])
    same = merge(tmp_path / "base", None, tmp_path / "same")  # same layout: bytes copied
    for n in CheckpointReader(tmp_path / "base").keys():
        np.testing.assert_array_equal(CheckpointReader(tmp_path / "same").get(n)[0],
                                      CheckpointReader(tmp_path / "base").get(n)[0])
    assert same.layout == "hf"


def test_side_files_config_and_provenance(tmp_path):
    model = make_base(tmp_path / "base", tied=True, layout="hf")
    make_adapter(model, tmp_path / "ad", tmp_path / "base", r=2, alpha=8.0)
    for junk in ("trainer_state.json", "optimizer.safetensors", "pytorch_model.bin"):  # an ernie-train checkpoint
        (tmp_path / "base" / junk).write_bytes(b"{}")
    s = merge(tmp_path / "base", tmp_path / "ad", tmp_path / "out", layout="paddle", max_shard_size="30KB")
    assert s.side_files == sorted(SIDE_FILES)
    for fname, data in SIDE_FILES.items():
        assert (tmp_path / "out" / fname).read_bytes() == data
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["Ernie4_5_ForCausalLM"] and cfg["tie_word_embeddings"] is True
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    reader = CheckpointReader(tmp_path / "out")
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(tmp_path / "out" / fname), "np") as f:  # the safetensors library's own validation
            meta = f.metadata()
            for key in f.keys():
                np.testing.assert_array_equal(f.get_tensor(key), reader.get(key)[0])
        assert meta["format"] == "np" and meta["merge_scaling"] == "[4.0]"
        assert meta["merge_base"].endswith("base") and meta["merge_adapter"].endswith("ad")
        assert meta["merge_adapter_format"] == "ernie-tools" and meta["merge_tool"].startswith("ernie-merge ")
    assert index["metadata"]["total_size"] == sum(reader.get(n)[0].nbytes for n in reader.keys())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left behind


def _fused_to_peft(tensors, cfg):
    """ernie-tools (Paddle, fused) -> PEFT (HF, per projection) exactly as docs/formats/adapter.md says."""
    q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A"):
            continue
        module, b = name[: -len(".lora_A")], tensors[name[: -len(".lora_A")] + ".lora_B"]
        parent, _, leaf = module.replace("ernie.", "model.", 1).rpartition(".")
        if leaf == "qkv_proj":
            parts = {"q_proj": b[:, :q], "k_proj": b[:, q:q + kv], "v_proj": b[:, q + kv:]}
        elif leaf == "up_gate_proj":
            parts = {"gate_proj": b[:, :i], "up_proj": b[:, i:]}
        else:
            parts = {leaf: b}
        for pname, pb in parts.items():
            key = "base_model.model." + (parent + "." if parent else "") + pname
            out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = a.T, pb.T
    return out


def test_peft_format_reads_like_the_fused_adapter(tmp_path):
    model = make_base(tmp_path / "base", tied=False, layout="paddle")
    cfg = model.config
    make_adapter(model, tmp_path / "ad", tmp_path / "base", targets=("qkv_proj", "up_gate_proj", "o_proj", "lm_head"),
                 r=4, alpha=6.0, rslora=True)
    from libernie.lora import read_adapter
    _, meta, tensors = read_adapter(tmp_path / "ad")
    (tmp_path / "peft").mkdir()
    write_safetensors_np(tmp_path / "peft" / "adapter_model.safetensors", _fused_to_peft(tensors, cfg))
    write_json(tmp_path / "peft" / "adapter_config.json", {"peft_type": "LORA", "r": 4, "lora_alpha": 6.0,
                                                           "use_rslora": True, "target_modules": ["q_proj"]})
    s = merge(tmp_path / "base", tmp_path / "peft", tmp_path / "out", layout="hf", verify=True)
    assert s.adapter_format == "peft" and s.scaling == [3.0] and s.verify["max_abs_diff"] < 1e-5
    np.testing.assert_allclose(logits(tmp_path / "out"), logits(model), atol=1e-5, rtol=0)


def test_paddleformers_adapter_on_a_tied_head_unties_the_model(tmp_path):
    model = make_base(tmp_path / "base", tied=True, layout="paddle")
    emb = model.ernie.embed_tokens.weight.numpy()
    make_adapter(model, tmp_path / "ad", tmp_path / "base", targets=("qkv_proj",), r=2, alpha=4.0)
    from libernie.lora import read_adapter
    _, _, tensors = read_adapter(tmp_path / "ad")
    rng = np.random.default_rng(0)
    head_a, head_b = rng.normal(0, 0.1, (64, 2)).astype(np.float32), rng.normal(0, 0.1, (2, 64)).astype(np.float32)
    tensors.update({"lm_head.lora_A": head_a, "lm_head.lora_B": head_b})
    (tmp_path / "pf").mkdir()
    names = sorted(tensors)  # two shards + index, as ERNIEKit writes them
    shards = {"peft_model-00001-of-00002.safetensors": names[:3], "peft_model-00002-of-00002.safetensors": names[3:]}
    for fname, keys in shards.items():
        write_safetensors_np(tmp_path / "pf" / fname, {k: tensors[k] for k in keys})
    write_json(tmp_path / "pf" / "peft_model.safetensors.index.json",
               {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}, "type": "lora"})
    write_json(tmp_path / "pf" / "lora_config.json", {"r": 2, "lora_alpha": 4, "rslora": False, "scaling": 2.0,
                                                      "target_modules": [".*qkv_proj.*", "lm_head"]})
    for layout, head_shape in (("paddle", (64, 64)), ("hf", (64, 64))):
        s = merge(tmp_path / "base", tmp_path / "pf", tmp_path / layout, layout=layout, verify=layout == "hf")
        assert s.untied and s.adapter_format == "paddleformers"
        if s.verify:  # the in-memory reference (base untied, deltas added) agrees
            assert s.verify["max_abs_diff"] < 1e-5 and s.verify["reference"] == "base + deltas in memory"
        assert json.loads((tmp_path / layout / "config.json").read_text())["tie_word_embeddings"] is False
        out = CheckpointReader(tmp_path / layout)
        head = out.get("lm_head.weight")[0]
        want = emb.T + 2.0 * head_a @ head_b  # Paddle head [h, V]
        np.testing.assert_allclose(head if layout == "paddle" else head.T, want, atol=1e-6)
        embed_name = "ernie.embed_tokens.weight" if layout == "paddle" else "model.embed_tokens.weight"
        np.testing.assert_array_equal(out.get(embed_name)[0], emb)  # the embedding itself is untouched
        # the truth: hidden states of the adapted (qkv) model, then h E^T + s (h A) B for the head
        with paddle.no_grad():
            h = model.ernie(paddle.to_tensor(IDS)).numpy()
        np.testing.assert_allclose(logits(tmp_path / layout), h @ emb.T + 2.0 * (h @ head_a) @ head_b, atol=1e-5)


def test_paddle_free_reader_agrees_with_libernie_lora(tmp_path):
    """ernie_merge.adapters reads ernie-train adapters without importing paddle; it must see what libernie sees."""
    from ernie_merge.adapters import read_adapter as ours
    from libernie.lora import read_adapter as theirs
    model = make_base(tmp_path / "base", tied=False, layout="hf")
    make_adapter(model, tmp_path / "ad", tmp_path / "base", targets=("qkv_proj", "down_proj", "lm_head"), r=3,
                 alpha=5.0, rslora=True)
    cfg, _, tensors = theirs(tmp_path / "ad")
    ad = ours(tmp_path / "ad", model.config)
    assert ad.kind == "ernie-tools" and ad.scalings() == [cfg.scaling] and not ad.replacements
    assert {d.target for d in ad.deltas} == {m + ".weight" for m in cfg.modules}
    for d in ad.deltas:
        module = d.target[: -len(".weight")]
        np.testing.assert_array_equal(d.a, tensors[module + ".lora_A"])
        np.testing.assert_array_equal(d.b, tensors[module + ".lora_B"])
        assert d.offset == 0


def test_a_merge_never_imports_paddle(tmp_path):
    """Importing paddle costs ~270 MB of RSS; the streaming path must not pay it (only --verify builds models)."""
    import subprocess
    import sys
    model = make_base(tmp_path / "base", tied=True, layout="paddle")
    make_adapter(model, tmp_path / "ad", tmp_path / "base")
    code = ("import sys; from ernie_merge.merge import merge; "
            f"merge({str(tmp_path / 'base')!r}, {str(tmp_path / 'ad')!r}, {str(tmp_path / 'out')!r}, layout='hf'); "
            "print('paddle' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
