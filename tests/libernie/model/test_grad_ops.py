"""The training twins (libernie.model.grad_ops) against autograd over the reference kernels: the same forward
bit for bit, the same gradients up to fp32 rounding; and a whole model's gradients unchanged."""
import numpy as np
import paddle
import pytest

from libernie.config import ErnieConfig
from libernie.kernels.ops import apply_rope, rope_cos_sin, swiglu
from libernie.lora import LoRAConfig, apply_lora
from libernie.model import ErnieForCausalLM, grad_ops


def _grads(fn, *xs):
    xs = [paddle.to_tensor(x, stop_gradient=sg) for x, sg in xs]
    y = fn(*xs)
    g = paddle.to_tensor(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
    (y * g).sum().backward()
    return y.numpy(), [None if x.stop_gradient else x.grad.numpy() for x in xs]


def test_rope_twin():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 4, 16)).astype(np.float32)
    cos, sin = rope_cos_sin(paddle.to_tensor(rng.integers(0, 50, (2, 7))), 16, 10000.0)
    ref = _grads(lambda a: apply_rope(a, cos, sin), (x, False))
    twin = _grads(lambda a: grad_ops._Rope.apply(a, cos, sin), (x, False))
    np.testing.assert_array_equal(twin[0], ref[0])
    np.testing.assert_allclose(twin[1][0], ref[1][0], rtol=1e-6, atol=1e-6)


def test_swiglu_twin():
    x = np.random.default_rng(0).standard_normal((2, 5, 2 * 48)).astype(np.float32) * 4
    ref = _grads(swiglu, (x, False))
    twin = _grads(grad_ops._SwiGLU.apply, (x, False))
    np.testing.assert_array_equal(twin[0], ref[0])
    np.testing.assert_allclose(twin[1][0], ref[1][0], rtol=1e-5, atol=1e-6)


def test_twins_run_only_when_a_gradient_flows():
    x = paddle.randn([3, 8])
    assert not grad_ops.active(x)                     # stop_gradient: the reference kernel runs
    x.stop_gradient = False
    assert grad_ops.active(x)
    with paddle.no_grad():
        assert not grad_ops.active(x)


def _model_grads(monkeypatch, twins: bool, lora: bool):
    if not twins:
        monkeypatch.setattr(grad_ops, "active", lambda x: False)
    cfg = ErnieConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    paddle.seed(3)
    model = ErnieForCausalLM(cfg)
    if lora:
        apply_lora(model, LoRAConfig(r=4, lora_alpha=8))
        for n, p in model.named_parameters():   # B = 0 at init would hide the adapter's path: give it values
            if n.endswith("lora_B"):
                p.set_value(paddle.randn(p.shape) * 0.1)
    ids = paddle.to_tensor(np.random.default_rng(2).integers(0, 97, (2, 12)))
    loss = model(ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [True, False])
def test_model_gradients_unchanged(monkeypatch, lora):
    loss_ref, ref = _model_grads(monkeypatch, twins=False, lora=lora)
    monkeypatch.undo()
    loss, got = _model_grads(monkeypatch, twins=True, lora=lora)
    assert loss == loss_ref                            # the forward is bit-identical
    assert ref.keys() == got.keys() and len(ref) > 0
    assert not lora or all(".lora_" in n for n in got)   # LoRA: only the adapter trains
    for n in ref:
        np.testing.assert_allclose(got[n], ref[n], rtol=1e-4, atol=1e-6, err_msg=n)
