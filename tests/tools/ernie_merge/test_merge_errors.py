"""Bad input fails before anything is written, in one line that names the file and says what to do."""
import json
import os

import numpy as np
import pytest
from merge_testlib import make_adapter, make_base, write_json, write_safetensors_np

from ernie_merge.merge import merge
from libernie.errors import CheckpointError, LoRAError, OutputPathError


@pytest.fixture
def base(tmp_path):
    make_base(tmp_path / "base", tied=True, layout="hf", shard="20KB")
    return tmp_path / "base"


def _peft(path, tensors, **cfg):
    path.mkdir()
    write_safetensors_np(path / "adapter_model.safetensors", tensors)
    write_json(path / "adapter_config.json", {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg})
    return path


def test_adapter_tensors_that_match_nothing_are_listed(tmp_path, base):
    a, b = np.zeros((2, 64), np.float32), np.zeros((96, 2), np.float32)
    ad = _peft(tmp_path / "ad", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": a,   # no layer 7
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": b,
        "base_model.model.model.layers.0.mlp.router.lora_A.weight": a})         # no such module
    with pytest.raises(LoRAError) as e:
        merge(base, ad, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith(f"{ad}/adapter_model.safetensors: 3 adapter tensor(s) match no base tensor: ")
    assert "layers.7.self_attn.q_proj.lora_A.weight" in msg and "mlp.router.lora_A.weight" in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()


def test_adapter_for_another_base_is_a_shape_error(tmp_path, base):
    other = make_base(tmp_path / "other", tied=True, layout="hf")
    make_adapter(other, tmp_path / "ad", tmp_path / "other", targets=("o_proj",))
    a = np.zeros((2, 32), np.float32)  # in=32, but the base's o_proj takes q_size=96
    ad = _peft(tmp_path / "bad", {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": a,
                                  "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": a.T.copy()})
    with pytest.raises(LoRAError, match=r"bad: .*o_proj.lora_A.weight gives a delta of shape \[32, 32\] .* "
                                        r"ernie.layers.0.self_attn.o_proj.weight \[96, 64\]; was it trained on another"):
        merge(base, ad, tmp_path / "out")


def test_rank_in_config_must_match_the_tensors(tmp_path, base):
    ad = _peft(tmp_path / "ad", {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight":
                                 np.zeros((3, 96), np.float32),
                                 "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight":
                                 np.zeros((64, 3), np.float32)})
    with pytest.raises(LoRAError, match="has rank 3, adapter_config.json says r=2"):
        merge(base, ad, tmp_path / "out")


@pytest.mark.parametrize("flag", ["use_dora", "lora_bias"])
def test_peft_variants_we_cannot_merge_are_refused(tmp_path, base, flag):
    ad = _peft(tmp_path / "ad", {}, **{flag: True})
    with pytest.raises(LoRAError, match=f"adapter_config.json: {flag} .* not supported"):
        merge(base, ad, tmp_path / "out")


def test_pickled_adapters_are_never_loaded(tmp_path, base):
    (tmp_path / "pf").mkdir()
    write_json(tmp_path / "pf" / "lora_config.json", {"r": 8, "lora_alpha": 16})
    (tmp_path / "pf" / "lora_model_state.pdparams").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(LoRAError, match="pickled .pdparams .* never unpickles"):
        merge(base, tmp_path / "pf", tmp_path / "out")


def test_existing_output_needs_force(tmp_path, base):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="out: already exists; choose another path or pass --force"):
        merge(base, None, tmp_path / "out")
    assert (tmp_path / "out" / "old.txt").read_text() == "keep me"
    merge(base, None, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "config.json").exists()
    with pytest.raises(CheckpointError, match="is the base model directory"):
        merge(base, None, base, force=True)


def test_truncated_base_shard_is_named(tmp_path, base):
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = base / sorted(set(index["weight_map"].values()))[-1]
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=rf"^{shard}: truncated or corrupt at tensor .*; re-copy the file$"):
        merge(base, None, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unknown_adapter_directory(tmp_path, base):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAError, match="no adapter_config.json .* or lora_config.json"):
        merge(base, tmp_path / "empty", tmp_path / "out")


def test_os_errors_are_one_line(tmp_path, base):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OutputPathError) as e:  # the parent of OUTDIR is a file: found before any input is read
        merge(base, None, tmp_path / "file" / "out")
    assert str(e.value) == (f"{tmp_path / 'file' / 'out'}: cannot be created: {tmp_path / 'file'} is not a "
                            "directory; choose another output path")
