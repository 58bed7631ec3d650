"""ernie-merge folds a LoRA adapter into routed and shared expert weights with no tool changes: the merged MoE
computes what base + adapter computes (libernie's unmerged LoRA layers are the truth), both layouts; the router
and its correction bias stay F32 and untouched."""
import numpy as np
import paddle
import pytest

from ernie_merge.merge import merge
from libernie.checkpoint import CheckpointReader
from libernie.config import ernie_tiny_moe
from libernie.lora import LoRAConfig, apply_lora, lora_parameters, save_adapter
from libernie.model import ErnieForCausalLM
from libernie.model.moe import moe_blocks

IDS = paddle.to_tensor([[1, 5, 9, 22, 40, 3, 7, 8]])


def _logits(m):
    with paddle.no_grad():
        return m(IDS).logits.numpy()


@pytest.mark.parametrize("src,dst", [("paddle", "paddle"), ("hf", "paddle"), ("paddle", "hf")])
def test_merged_moe_equals_base_plus_expert_adapter(tmp_path, src, dst):
    paddle.seed(4)
    model = ErnieForCausalLM(ernie_tiny_moe(vocab_size=64))
    for blk in moe_blocks(model):
        blk.moe_statics.e_score_correction_bias.set_value(paddle.randn([1, blk.num_experts]) * 0.05)
    model.eval()
    model.save_pretrained(tmp_path / "base", layout=src)
    model = ErnieForCausalLM.from_pretrained(tmp_path / "base")
    base = _logits(model)
    cfg = LoRAConfig(r=2, target_modules=("qkv_proj", "experts.up_gate_proj", "experts.down_proj",
                                          "shared_experts.down_proj"))
    apply_lora(model, cfg)
    for p in lora_parameters(model).values():
        p.set_value(paddle.randn(p.shape) * 0.1)
    save_adapter(model, cfg, tmp_path / "ad", base_model=tmp_path / "base")
    adapted = _logits(model)
    s = merge(tmp_path / "base", tmp_path / "ad", tmp_path / "out", layout=dst)
    assert s.tensors_merged == 3 + 2 * (8 * 2 + 1)  # qkv x 3 layers; per MoE layer 8 experts x 2 + shared down
    merged = ErnieForCausalLM.from_pretrained(tmp_path / "out")
    assert np.abs(adapted - base).max() > 1e-2
    np.testing.assert_allclose(_logits(merged), adapted, atol=1e-5, rtol=0)
    r, b = CheckpointReader(tmp_path / "out"), CheckpointReader(tmp_path / "base")
    pre = {"paddle": "ernie.", "hf": "model."}
    for name in ("layers.1.mlp.gate.weight", "layers.2.mlp.moe_statics.e_score_correction_bias"):
        arr, dt = r.get(pre[dst] + name)
        ref, _ = b.get(pre[src] + name)
        assert dt == "F32"
        np.testing.assert_array_equal(arr, ref.T if name.endswith("gate.weight") and src != dst else ref)
