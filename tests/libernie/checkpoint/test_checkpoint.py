"""Checkpoint I/O: layout round trips bit for bit, shards, bf16, and one-line errors on bad files."""
import json
import os
import struct

import numpy as np
import paddle
import pytest

from libernie.checkpoint import (CheckpointReader, SafetensorsFile, convert_checkpoint, from_float32, parse_size,
                                 to_float32, write_safetensors)
from libernie.config import ernie_tiny
from libernie.errors import CheckpointError
from libernie.model import ErnieForCausalLM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paddle.seed(2)
    cfg = ernie_tiny(vocab_size=50)
    cfg.use_bias = True
    cfg.tie_word_embeddings = False
    m = ErnieForCausalLM(cfg)
    root = tmp_path_factory.mktemp("ckpt")
    m.save_pretrained(root / "pd", layout="paddle", max_shard_size="20KB")
    m.save_pretrained(root / "pd_bf16", layout="paddle", dtype="bf16")
    return m, root


def _all(reader):
    return {n: reader.get(n) for n in reader.keys()}


@pytest.mark.parametrize("src", ["pd", "pd_bf16"])
def test_paddle_hf_paddle_round_trip_is_bit_exact(tiny, tmp_path, src):
    _, root = tiny
    convert_checkpoint(root / src, tmp_path / "hf", layout="hf", max_shard_size="15KB")
    convert_checkpoint(tmp_path / "hf", tmp_path / "back", layout="paddle")
    a, hf, b = (CheckpointReader(p) for p in (root / src, tmp_path / "hf", tmp_path / "back"))
    assert (a.layout, hf.layout, b.layout) == ("paddle", "hf", "paddle")
    ta, tb = _all(a), _all(b)
    assert sorted(ta) == sorted(tb)
    for name, (arr, dt) in ta.items():
        assert tb[name][1] == dt == ("BF16" if "bf16" in src else "F32")
        assert arr.tobytes() == np.ascontiguousarray(tb[name][0]).tobytes(), name
    # HF names and orientation: q_proj is [q, h], the Paddle fused qkv is [h, q + 2kv]
    cfg = tiny[0].config
    q, _ = hf.get("model.layers.0.self_attn.q_proj.weight")
    qkv, _ = a.get("ernie.layers.0.self_attn.qkv_proj.weight")
    assert q.shape == (cfg.q_size, cfg.hidden_size)
    assert np.array_equal(q, qkv[:, : cfg.q_size].T)
    gate, _ = hf.get("model.layers.1.mlp.gate_proj.weight")
    ug, _ = a.get("ernie.layers.1.mlp.up_gate_proj.weight")
    assert np.array_equal(gate, ug[:, : cfg.intermediate_size].T)  # gate is the FIRST half
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == ["Ernie4_5ForCausalLM"]
    assert json.load(open(tmp_path / "back" / "config.json"))["architectures"] == ["Ernie4_5_ForCausalLM"]


def test_shards_respect_the_size_budget_and_index_total(tiny):
    _, root = tiny
    index = json.load(open(root / "pd" / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = 0
    for f in files:
        sf = SafetensorsFile(str(root / "pd" / f))
        nbytes = [sf.get(n).nbytes for n in sf.names]
        assert sum(nbytes) <= 20_000 or len(nbytes) == 1
        total += sum(nbytes)
    assert index["metadata"]["total_size"] == total


def test_bf16_checkpoint_loads_exactly_into_fp32(tiny):
    m, root = tiny
    loaded = ErnieForCausalLM.from_pretrained(root / "pd_bf16")
    w = m.ernie.layers[0].self_attn.qkv_proj.weight.numpy()
    expect = to_float32(from_float32(w, "BF16"), "BF16")
    assert loaded.ernie.layers[0].self_attn.qkv_proj.weight.dtype == paddle.float32
    np.testing.assert_array_equal(loaded.ernie.layers[0].self_attn.qkv_proj.weight.numpy(), expect)


def test_bf16_rounding_is_round_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.inf], np.float32)
    # 1+2^-8 is a tie between 1 and 1+2^-7: even mantissa wins (1.0); 1+3*2^-8 rounds up to 1+2^-6
    np.testing.assert_array_equal(to_float32(from_float32(x, "BF16"), "BF16"), [1.0, 1.0, 1.0 + 2**-6, -2.5, np.inf])


def test_safetensors_golden_bytes(tmp_path):
    p = str(tmp_path / "x.safetensors")
    write_safetensors(p, {"w": (np.array([1.0, 2.0], np.float32), "F32")}, {"format": "pt"})
    raw = open(p, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header == {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert n % 8 == 0 and raw[8 + n:] == struct.pack("<2f", 1.0, 2.0)


def test_save_keeps_tokenizer_files_already_in_the_directory(tiny, tmp_path):
    m, _ = tiny
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.model").write_bytes(b"spm")
    m.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"spm"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left behind


def test_truncated_shard_names_the_file(tiny, tmp_path):
    _, root = tiny
    convert_checkpoint(root / "pd", tmp_path / "c", layout="paddle")
    shard = sorted((tmp_path / "c").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        ErnieForCausalLM.from_pretrained(tmp_path / "c")


def test_mismatched_config_is_a_one_line_error(tiny, tmp_path):
    _, root = tiny
    convert_checkpoint(root / "pd", tmp_path / "c", layout="hf")
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    json.dump({**cfg, "intermediate_size": 99}, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight has shape .* config.json implies") as e:
        ErnieForCausalLM.from_pretrained(tmp_path / "c")
    assert "\n" not in str(e.value)
    json.dump({**cfg, "num_hidden_layers": 1}, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="config.json does not describe, first model.layers.1"):
        ErnieForCausalLM.from_pretrained(tmp_path / "c")


def test_missing_things(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a valid index"):
        CheckpointReader(tmp_path)


def test_refuses_to_overwrite_without_permission(tiny, tmp_path):
    _, root = tiny
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(root / "pd", tmp_path / "exists", layout="hf")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError):
        parse_size("lots")
