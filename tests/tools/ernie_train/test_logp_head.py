"""ernie_train.logp_head: the one-node LM-head log-prob (_LinearLogp) against Paddle's cross_entropy on the same
logits (the generic path), values and gradients, for every head ERNIE 4.5 has: tied, untied, untied with bias,
the head frozen (LoRA) or trained (full fine-tuning)."""
import numpy as np
import paddle
import pytest

from libernie.config import ErnieConfig
from libernie.lora import LoRAConfig, apply_lora
from libernie.model import ErnieForCausalLM

from ernie_train import logp_head


def _model(tied: bool, bias: bool):
    cfg = ErnieConfig(vocab_size=211, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied)
    paddle.seed(0)
    model = ErnieForCausalLM(cfg)
    if bias:  # the MoE models' head (use_bias): an untied Linear with a bias
        model.lm_head = paddle.nn.Linear(32, 211)
        model.lm_head.bias.set_value(paddle.randn([211]))
    return model


def _run(model, fast: bool, frozen_head: bool):
    for p in model.parameters():
        p.stop_gradient = frozen_head
    hs = paddle.to_tensor(np.random.default_rng(1).standard_normal((9, 32)).astype(np.float32) * 2,
                          stop_gradient=False)
    tgt = paddle.to_tensor(np.array([0, 5, 210, 7, 7, 100, 3, 1, 42]))
    fn = logp_head.target_logps if fast else logp_head._cross_entropy_logps
    out = fn(model, hs, tgt)
    g = paddle.to_tensor(np.linspace(-1.5, 2.0, 9).astype(np.float32))
    (out * g).sum().backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    return out.numpy(), hs.grad.numpy(), grads


@pytest.mark.parametrize("tied,bias", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("frozen_head", [True, False])
def test_fast_head_equals_cross_entropy(tied, bias, frozen_head):
    model = _model(tied, bias)
    assert logp_head._plain_head(model) is not None
    ref = _run(model, fast=False, frozen_head=frozen_head)
    model.clear_gradients()
    got = _run(model, fast=True, frozen_head=frozen_head)
    np.testing.assert_array_equal(got[0], ref[0])                   # the same cross_entropy call
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == ref[2].keys() and (len(got[2]) > 0) == (not frozen_head)
    for n in ref[2]:
        np.testing.assert_allclose(got[2][n], ref[2][n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_lora_on_the_head_takes_the_generic_path():
    model = _model(tied=False, bias=False)
    apply_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=("lm_head",)))
    assert logp_head._plain_head(model) is None
    hs = paddle.randn([4, 32])
    hs.stop_gradient = False
    out = logp_head.target_logps(model, hs, paddle.to_tensor([1, 2, 3, 4]))
    out.sum().backward()
    assert model.lm_head.lora_A.grad is not None      # the adapter on the head still trains
