"""LoRA: the adapted layer computes x W + s x A B, adapters round-trip, and bad adapters fail in one line."""
import json

import numpy as np
import paddle
import pytest

from libernie.config import ernie_tiny
from libernie.errors import LoRAError
from libernie.lora import LoRAConfig, apply_lora, lora_parameters, save_adapter
from libernie.model import ErnieForCausalLM


def _model(seed=0, tied=True):
    paddle.seed(seed)
    cfg = ernie_tiny(vocab_size=64)
    cfg.tie_word_embeddings = tied
    m = ErnieForCausalLM(cfg)
    m.eval()
    return m


def test_scaling_rules():
    assert LoRAConfig(r=8).lora_alpha == 16 and LoRAConfig(r=8).scaling == 2.0
    assert LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0


def test_adapted_layer_equals_merged_weight():
    m = _model()
    ids = paddle.to_tensor([[3, 4, 5, 6, 7]])
    names = apply_lora(m, LoRAConfig(r=4, lora_alpha=8))
    assert len(names) == 4 * m.config.num_hidden_layers
    with paddle.no_grad():
        base = m(ids).logits.numpy()  # B = 0 at init: the adapter changes nothing
        for p in lora_parameters(m).values():
            p.set_value(paddle.randn(p.shape) * 0.1)
        adapted = m(ids).logits.numpy()
        for _, layer in m.named_sublayers():
            if hasattr(layer, "lora_A"):
                w = layer.weight.numpy() + layer.lora_A.numpy() @ layer.lora_B.numpy() * 2.0
                layer.weight.set_value(w)
                layer.lora_B.set_value(np.zeros(layer.lora_B.shape, np.float32))
        merged = m(ids).logits.numpy()
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(merged, adapted, atol=1e-5)


def test_only_lora_parameters_train():
    m = _model()
    apply_lora(m, LoRAConfig(r=2, target_modules=("o_proj",)))
    trainable = sorted(n for n, p in m.named_parameters() if not p.stop_gradient)
    assert trainable == sorted(f"ernie.layers.{i}.self_attn.o_proj.lora_{x}" for i in range(2) for x in "AB")


def test_adapter_round_trip_through_from_pretrained(tmp_path):
    m = _model(tied=False)
    m.save_pretrained(tmp_path / "base", layout="paddle")
    cfg = LoRAConfig(r=4, use_rslora=True, target_modules=("qkv_proj", "down_proj", "lm_head"))
    apply_lora(m, cfg)
    for p in lora_parameters(m).values():
        p.set_value(paddle.randn(p.shape) * 0.1)
    save_adapter(m, cfg, tmp_path / "adapter", base_model=tmp_path / "base")
    meta = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert meta["scaling"] == 4.0 and meta["layout"] == "paddle" and "lm_head" in meta["modules"]
    loaded = ErnieForCausalLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    ids = paddle.to_tensor([[1, 2, 3, 9]])
    with paddle.no_grad():
        np.testing.assert_allclose(loaded(ids).logits.numpy(), m(ids).logits.numpy(), atol=1e-6)


def test_target_that_matches_nothing_is_an_error():
    with pytest.raises(LoRAError, match="'q_proj' matches no Linear"):
        apply_lora(_model(), LoRAConfig(target_modules=("q_proj",)))


def test_adapter_for_another_base_is_rejected(tmp_path):
    m = _model()
    cfg = LoRAConfig(r=2)
    apply_lora(m, cfg)
    save_adapter(m, cfg, tmp_path / "a")
    other = ernie_tiny(vocab_size=64)
    other.hidden_size = 32
    m2 = ErnieForCausalLM(other)
    m2.save_pretrained(tmp_path / "b")
    with pytest.raises(LoRAError, match="was it trained on another base"):
        ErnieForCausalLM.from_pretrained(tmp_path / "b", adapter=tmp_path / "a")
