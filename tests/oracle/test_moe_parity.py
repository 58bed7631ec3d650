"""libernie's MoE against transformers' Ernie4_5_MoeForCausalLM on CPU torch, both directions, within 1e-5 (fp32).

transformers builds random MoE models (tests/oracle/hf_oracle.py in .venv-oracle) over expert counts, k,
shared-expert counts, layer start/end/interval, biases and a non-zero e_score_correction_bias; libernie must
load them with the same logits and greedy continuation. Then libernie writes HF checkpoints (directly, and via
the Paddle layout) and transformers must load them and agree.
"""
import json

import numpy as np
import paddle
import pytest

from libernie.checkpoint import CheckpointReader, convert_checkpoint
from libernie.config import ernie_tiny_moe
from libernie.model import ErnieForCausalLM
from libernie.model.moe import moe_blocks

from oracle_testlib import IDS, logits as _logits, run_oracle as _oracle

pytestmark = pytest.mark.oracle
TOL = 1e-5

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, initializer_range=0.08, rope_theta=10000.0,
             moe_intermediate_size=32, moe_norm_min=1e-12)
CASES = {
    # name: config overrides. E experts, k, shared, which layers (start/end/interval), tied/untied, biases.
    "e4_k1_noshared_every_layer": dict(moe_num_experts=4, moe_k=1, moe_num_shared_experts=0,
                                       moe_layer_start_index=0, moe_layer_interval=1),
    "e8_k2_shared1_start1": dict(moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, num_hidden_layers=3,
                                 moe_layer_start_index=1, moe_layer_interval=1),
    "e6_k3_shared2_interval2_end2": dict(moe_num_experts=6, moe_k=3, moe_num_shared_experts=2, num_hidden_layers=4,
                                         moe_layer_start_index=0, moe_layer_end_index=2, moe_layer_interval=2),
    "e16_k6_untied_use_bias": dict(moe_num_experts=16, moe_k=6, moe_num_shared_experts=2, tie_word_embeddings=False,
                                   use_bias=True, moe_layer_start_index=1, num_hidden_layers=2,
                                   moe_intermediate_size=24),
}
BIAS_STD = 0.05  # e_score_correction_bias ~ N(0, 0.05): big enough against probs ~1/E to change selections



@pytest.fixture(scope="session")
def hf_moe_models(oracle_python, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    spec = [{"name": n, "seed": 10 + i, "config": {**_BASE, **over}, "input_ids": IDS.tolist(),
             "correction_bias_std": BIAS_STD, "generate": {"prompt_len": 6, "new_tokens": 8}, "max_shard_size": "60KB"}
            for i, (n, over) in enumerate(CASES.items())]
    (root / "spec.json").write_text(json.dumps(spec))
    _oracle(oracle_python, "build", str(root / "spec.json"), str(root))
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_moe_checkpoint_loads_with_same_logits(hf_moe_models, case):
    d = hf_moe_models / case
    model = ErnieForCausalLM.from_pretrained(d)
    cfg, over = model.config, CASES[case]
    assert cfg.moe_num_experts == over["moe_num_experts"] and cfg.moe_k == over["moe_k"]
    moe_layers = [i for i, layer in enumerate(model.ernie.layers) if layer.mlp in moe_blocks(model)]
    expect = [i for i in range(cfg.num_hidden_layers) if (i + 1) % cfg.moe_layer_interval == 0
              and cfg.moe_layer_start_index <= i <= (over.get("moe_layer_end_index", cfg.num_hidden_layers - 1))]
    assert moe_layers == expect and moe_layers
    ref = np.load(d / "ref_logits.npy")
    assert np.abs(ref).max() > 0.5, "logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(_logits(model), ref, rtol=0, atol=TOL)
    # the correction bias really changed which experts were picked: zeroing it moves the logits
    for blk in moe_blocks(model):
        assert np.abs(blk.moe_statics.e_score_correction_bias.numpy()).max() > 0.01
        blk.moe_statics.e_score_correction_bias.set_value(paddle.zeros_like(blk.moe_statics.e_score_correction_bias))
    assert np.abs(_logits(model) - ref).max() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_moe_greedy_continuation_matches_transformers(hf_moe_models, case):
    model = ErnieForCausalLM.from_pretrained(hf_moe_models / case)
    ours = model.generate(IDS[0, :6].tolist(), max_new_tokens=8, eos_token_id=-1)[0]
    assert ours == np.load(hf_moe_models / case / "ref_greedy.npy").tolist()


def test_transformers_writes_the_documented_hf_names(hf_moe_models):
    """The HF layout of docs/formats/checkpoint.md is what transformers itself saves."""
    r = CheckpointReader(hf_moe_models / "e8_k2_shared1_start1")
    p = "model.layers.1.mlp."
    for name, shape in [("gate.weight", (8, 64)), ("moe_statics.e_score_correction_bias", (1, 8)),
                        ("experts.7.gate_proj.weight", (32, 64)), ("experts.7.up_proj.weight", (32, 64)),
                        ("experts.7.down_proj.weight", (64, 32)), ("shared_experts.gate_proj.weight", (32, 64)),
                        ("shared_experts.down_proj.weight", (64, 32))]:
        arr, dt = r.get(p + name)
        assert arr.shape == shape and dt == "F32", name
    assert "model.layers.0.mlp.gate_proj.weight" in r  # layer 0 stays dense (start index 1)


@pytest.fixture(scope="session")
def libernie_written_moe(oracle_python, hf_moe_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ours_moe")
    cases = []
    for name in CASES:
        model = ErnieForCausalLM.from_pretrained(hf_moe_models / name)
        model.save_pretrained(root / f"{name}-hf", layout="hf", max_shard_size="50KB")
        model.save_pretrained(root / f"{name}-pd", layout="paddle")
        convert_checkpoint(root / f"{name}-pd", root / f"{name}-pd2hf", layout="hf")
        cases += [(f"{name}-hf", _logits(model)), (f"{name}-pd2hf", _logits(model))]
    paddle.seed(11)  # built by libernie from its own preset, bias set by us, never seen by transformers;
    cfg = ernie_tiny_moe(vocab_size=320)  # with an MTP head, as published checkpoints have (transformers skips it)
    cfg.extra["num_nextn_predict_layers"] = 1
    scratch = ErnieForCausalLM(cfg)
    for blk in moe_blocks(scratch):
        blk.moe_statics.e_score_correction_bias.set_value(paddle.randn([1, blk.num_experts]) * BIAS_STD)
    scratch.eval()
    scratch.save_pretrained(root / "scratch-hf", layout="hf")
    cases.append(("scratch-hf", _logits(scratch)))
    spec = [{"dir": str(root / n), "input_ids": IDS.tolist()} for n, _ in cases]
    (root / "spec.json").write_text(json.dumps(spec))
    _oracle(oracle_python, "run", str(root / "spec.json"))
    return root, dict(cases)


def test_transformers_loads_the_moe_libernie_wrote(libernie_written_moe):
    root, ours = libernie_written_moe
    assert len(ours) == 2 * len(CASES) + 1
    for name, logits in ours.items():
        assert json.load(open(root / name / "config.json"))["architectures"] == ["Ernie4_5_MoeForCausalLM"]
        np.testing.assert_allclose(np.load(root / name / "ref_logits.npy"), logits, rtol=0, atol=TOL, err_msg=name)
