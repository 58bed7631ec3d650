"""LoRA on an MoE model: routed and shared expert Linears are adapted (all, or one kind by a dotted target),
the router never is, merged weights equal the adapted model, and adapters round-trip through from_pretrained."""
import numpy as np
import paddle
import pytest

from libernie.config import ernie_tiny_moe
from libernie.errors import LoRAError
from libernie.lora import LoRAConfig, apply_lora, lora_parameters, matches_target, save_adapter
from libernie.model import ErnieForCausalLM
from libernie.model.moe import moe_blocks

IDS = paddle.to_tensor([[3, 4, 5, 6, 7, 30, 31, 2]])


def _model(seed=0):
    paddle.seed(seed)
    cfg = ernie_tiny_moe(vocab_size=64)
    cfg.initializer_range = 0.1
    m = ErnieForCausalLM(cfg)
    m.eval()
    return m


def test_targets_match_by_trailing_components():
    assert matches_target("ernie.layers.1.mlp.experts.3.down_proj", "down_proj")
    assert matches_target("ernie.layers.1.mlp.experts.3.down_proj", "experts.down_proj")
    assert not matches_target("ernie.layers.1.mlp.shared_experts.down_proj", "experts.down_proj")
    assert matches_target("ernie.layers.1.mlp.shared_experts.down_proj", "shared_experts.down_proj")
    assert not matches_target("ernie.layers.0.mlp.down_proj", "experts.down_proj")


def test_default_targets_wrap_routed_and_shared_experts_but_not_the_router():
    m = _model()
    names = apply_lora(m, LoRAConfig(r=2))
    e = m.config.moe_num_experts
    assert "ernie.layers.1.mlp.experts.7.up_gate_proj" in names
    assert "ernie.layers.2.mlp.shared_experts.down_proj" in names
    # per layer: qkv, o + dense (2) or routed (2e) + shared (2)
    assert len(names) == 3 * 2 + 2 + 2 * (2 * e + 2)
    assert not any("gate.weight" in n or "moe_statics" in n for n in lora_parameters(m))
    assert all(p.stop_gradient for n, p in m.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("targets,count", [(("experts.up_gate_proj",), 16), (("shared_experts.down_proj",), 2)])
def test_one_kind_of_expert_can_be_targeted(targets, count):
    names = apply_lora(_model(), LoRAConfig(r=2, target_modules=targets))
    assert len(names) == count and all(matches_target(n, targets[0]) for n in names)


def test_adapted_experts_equal_merged_weights_and_train():
    m = _model(1)
    cfg = LoRAConfig(r=4, lora_alpha=8)
    apply_lora(m, cfg)
    with paddle.no_grad():
        base = m(IDS).logits.numpy()
        for p in lora_parameters(m).values():
            p.set_value(paddle.randn(p.shape) * 0.1)
        adapted = m(IDS).logits.numpy()
    m.train()
    m(IDS).logits.sum().backward()
    blk = moe_blocks(m)[0]
    used = [i for i, n in enumerate(blk.load.tolist()) if n]
    assert used and all(blk.experts[i].down_proj.lora_B.grad is not None for i in used)
    assert blk.shared_experts.up_gate_proj.lora_A.grad is not None
    m.eval()
    with paddle.no_grad():
        for _, layer in m.named_sublayers():
            if hasattr(layer, "lora_A"):
                layer.weight.set_value(layer.weight.numpy() + layer.lora_A.numpy() @ layer.lora_B.numpy() * 2.0)
                layer.lora_B.set_value(np.zeros(layer.lora_B.shape, np.float32))
        merged = m(IDS).logits.numpy()
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(merged, adapted, atol=1e-5)


def test_expert_adapter_round_trip(tmp_path):
    m = _model(2)
    m.save_pretrained(tmp_path / "base", layout="paddle")
    cfg = LoRAConfig(r=2, target_modules=("qkv_proj", "experts.down_proj", "shared_experts.up_gate_proj"))
    apply_lora(m, cfg)
    for p in lora_parameters(m).values():
        p.set_value(paddle.randn(p.shape) * 0.1)
    save_adapter(m, cfg, tmp_path / "adapter", base_model=tmp_path / "base")
    loaded = ErnieForCausalLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    with paddle.no_grad():
        np.testing.assert_allclose(loaded(IDS).logits.numpy(), m(IDS).logits.numpy(), atol=1e-6)


def test_expert_target_on_a_dense_model_is_an_error():
    from libernie.config import ernie_tiny
    with pytest.raises(LoRAError, match="'experts.down_proj' matches no Linear"):
        apply_lora(ErnieForCausalLM(ernie_tiny(vocab_size=32)), LoRAConfig(target_modules=("experts.down_proj",)))


def test_mtp_heads_are_not_adapted():
    cfg = ernie_tiny_moe(vocab_size=64)
    cfg.extra["num_nextn_predict_layers"] = 1
    names = apply_lora(ErnieForCausalLM(cfg), LoRAConfig(r=2))
    assert names and not [n for n in names if ".mtp_" in n]
