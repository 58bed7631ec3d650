"""MoE checkpoints: both layouts round trip bit for bit, the router and its bias stay F32 on disk in a bf16
checkpoint, a checkpoint without the correction bias loads with zeros, and mismatches are one-line errors."""
import json

import numpy as np
import paddle
import pytest

from libernie.checkpoint import CheckpointReader, convert_checkpoint
from libernie.config import ernie_tiny_moe
from libernie.errors import CheckpointError
from libernie.model import ErnieForCausalLM
from libernie.model.moe import moe_blocks

IDS = paddle.to_tensor([[3, 9, 1, 30, 31, 7, 8]])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    paddle.seed(3)
    cfg = ernie_tiny_moe(vocab_size=48)
    cfg.moe_num_shared_experts = 2
    m = ErnieForCausalLM(cfg)
    for blk in moe_blocks(m):
        blk.moe_statics.e_score_correction_bias.set_value(paddle.randn([1, blk.num_experts]) * 0.05)
    m.eval()
    root = tmp_path_factory.mktemp("moe_ckpt")
    m.save_pretrained(root / "pd", layout="paddle", max_shard_size="40KB")
    m.save_pretrained(root / "pd_bf16", layout="paddle", dtype="bf16")
    return m, root


def _all(reader):
    return {n: reader.get(n) for n in reader.keys()}


@pytest.mark.parametrize("src", ["pd", "pd_bf16"])
def test_moe_paddle_hf_paddle_round_trip_is_bit_exact(moe, tmp_path, src):
    m, root = moe
    convert_checkpoint(root / src, tmp_path / "hf", layout="hf", max_shard_size="30KB")
    convert_checkpoint(tmp_path / "hf", tmp_path / "back", layout="paddle")
    a, hf, b = (CheckpointReader(p) for p in (root / src, tmp_path / "hf", tmp_path / "back"))
    ta, tb = _all(a), _all(b)
    assert sorted(ta) == sorted(tb)
    for name, (arr, dt) in ta.items():
        routing = name.endswith("mlp.gate.weight") or "moe_statics" in name
        assert tb[name][1] == dt == ("F32" if routing or src == "pd" else "BF16"), name
        assert arr.tobytes() == np.ascontiguousarray(tb[name][0]).tobytes(), name
    cfg, e, w = m.config, m.config.moe_num_experts, m.config.expert_size
    g, dt = hf.get("model.layers.1.mlp.gate.weight")
    assert g.shape == (e, cfg.hidden_size) and dt == "F32"
    np.testing.assert_array_equal(g, a.get("ernie.layers.1.mlp.gate.weight")[0].T)
    gp, _ = hf.get("model.layers.2.mlp.experts.5.gate_proj.weight")
    ug, _ = a.get("ernie.layers.2.mlp.experts.5.up_gate_proj.weight")
    assert gp.shape == (w, cfg.hidden_size) and np.array_equal(gp, ug[:, :w].T)  # gate is the FIRST half
    assert hf.get("model.layers.1.mlp.shared_experts.up_proj.weight")[0].shape == (2 * w, cfg.hidden_size)
    assert hf.get("model.layers.1.mlp.moe_statics.e_score_correction_bias")[0].shape == (1, e)
    assert "model.layers.0.mlp.gate_proj.weight" in hf and "model.layers.0.mlp.gate.weight" not in hf
    assert json.load(open(tmp_path / "back" / "config.json"))["architectures"] == ["Ernie4_5_MoeForCausalLM"]


def test_moe_loads_back_with_the_same_logits(moe, tmp_path):
    m, root = moe
    m.save_pretrained(tmp_path / "hf", layout="hf")
    with paddle.no_grad():
        ref = m(IDS).logits.numpy()
        for d in (root / "pd", tmp_path / "hf"):
            np.testing.assert_array_equal(ErnieForCausalLM.from_pretrained(d)(IDS).logits.numpy(), ref)
        bf16 = ErnieForCausalLM.from_pretrained(root / "pd_bf16")
    # the routing tensors came back exactly (F32 on disk), the experts rounded to bf16
    blk, blk16 = moe_blocks(m)[0], moe_blocks(bf16)[0]
    np.testing.assert_array_equal(blk16.gate.weight.numpy(), blk.gate.weight.numpy())
    np.testing.assert_array_equal(blk16.moe_statics.e_score_correction_bias.numpy(),
                                  blk.moe_statics.e_score_correction_bias.numpy())
    assert not np.array_equal(blk16.experts[0].down_proj.weight.numpy(), blk.experts[0].down_proj.weight.numpy())


def test_missing_correction_bias_loads_as_zeros(moe, tmp_path):
    """PaddleFormers writes the bias only with moe_use_aux_free; without it selection is plain top-k."""
    m, root = moe
    from libernie.checkpoint.safetensors_io import write_safetensors
    r = CheckpointReader(root / "pd")
    tensors = {n: r.get(n) for n in r.keys() if "moe_statics" not in n}
    (tmp_path / "nb").mkdir()
    write_safetensors(str(tmp_path / "nb" / "model.safetensors"), tensors, {"format": "np"})
    (tmp_path / "nb" / "config.json").write_text((root / "pd" / "config.json").read_text())
    loaded = ErnieForCausalLM.from_pretrained(tmp_path / "nb")
    assert all(float(b.moe_statics.e_score_correction_bias.abs().sum()) == 0 for b in moe_blocks(loaded))
    plain = ErnieForCausalLM.from_pretrained(root / "pd")
    for b in moe_blocks(plain):
        b.moe_statics.e_score_correction_bias.set_value(paddle.zeros([1, b.num_experts]))
    with paddle.no_grad():
        np.testing.assert_array_equal(loaded(IDS).logits.numpy(), plain(IDS).logits.numpy())


def test_moe_config_mismatch_is_a_one_line_error(moe, tmp_path):
    _, root = moe
    convert_checkpoint(root / "pd", tmp_path / "c", layout="hf")
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    json.dump({**cfg, "moe_num_experts": 6}, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="config.json does not describe, first model.layers.1.mlp.experts.6"):
        ErnieForCausalLM.from_pretrained(tmp_path / "c")
    json.dump({**cfg, "moe_intermediate_size": 40}, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"experts.0.gate_proj.weight has shape .* implies") as e:
        ErnieForCausalLM.from_pretrained(tmp_path / "c")
    assert "\n" not in str(e.value)
    json.dump({**cfg, "moe_layer_start_index": 2}, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="config.json does not describe"):
        ErnieForCausalLM.from_pretrained(tmp_path / "c")


def test_undeclared_mtp_tensors_are_refused_with_a_clear_error(moe, tmp_path):
    _, root = moe
    from libernie.checkpoint.safetensors_io import write_safetensors
    r = CheckpointReader(root / "pd")
    tensors = {n: r.get(n) for n in r.keys()}
    tensors["ernie.mtp_linear_proj.0.weight"] = (np.zeros((128, 64), np.float32), "F32")
    (tmp_path / "mtp").mkdir()
    write_safetensors(str(tmp_path / "mtp" / "model.safetensors"), tensors, {"format": "np"})
    (tmp_path / "mtp" / "config.json").write_text((root / "pd" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="first ernie.mtp_linear_proj.0.weight; multi-token-prediction heads"):
        ErnieForCausalLM.from_pretrained(tmp_path / "mtp")


def test_mtp_heads_are_carried_through_both_layouts(tmp_path):
    """Published MoE checkpoints carry multi-token-prediction heads (num_nextn_predict_layers): a dense layer
    `mtp_block.N`, two norms and `mtp_linear_proj.N` [2h -> h]. They load, survive both layouts bit for bit
    and never change the logits (the forward does not use them, as in transformers)."""
    paddle.seed(12)
    cfg = ernie_tiny_moe(vocab_size=48)
    cfg.extra["num_nextn_predict_layers"] = 1
    m = ErnieForCausalLM(cfg)
    m.eval()
    m.save_pretrained(tmp_path / "pd", layout="paddle")
    convert_checkpoint(tmp_path / "pd", tmp_path / "hf", layout="hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "back", layout="paddle")
    pd, hf, back = (CheckpointReader(tmp_path / d) for d in ("pd", "hf", "back"))
    h = cfg.hidden_size
    assert pd.get("ernie.mtp_linear_proj.0.weight")[0].shape == (2 * h, h)
    assert hf.get("model.mtp_linear_proj.0.weight")[0].shape == (h, 2 * h)
    assert hf.get("model.mtp_block.0.mlp.gate_proj.weight")[0].shape == (cfg.intermediate_size, h)  # dense
    assert "model.mtp_emb_norm.0.weight" in hf and "model.mtp_block.0.self_attn.k_proj.weight" in hf
    assert sorted(pd.keys()) == sorted(back.keys())
    for n in pd.keys():
        assert pd.get(n)[0].tobytes() == np.ascontiguousarray(back.get(n)[0]).tobytes(), n
    with paddle.no_grad():
        ref = m(IDS).logits.numpy()
        loaded = ErnieForCausalLM.from_pretrained(tmp_path / "hf")
        np.testing.assert_array_equal(loaded(IDS).logits.numpy(), ref)
    np.testing.assert_array_equal(loaded.ernie.mtp_block[0].mlp.down_proj.weight.numpy(),
                                  m.ernie.mtp_block[0].mlp.down_proj.weight.numpy())
