"""libernie against transformers' Ernie4_5ForCausalLM on CPU torch, both directions, within 1e-5 (fp32).

Models are built by transformers with random weights (tests/oracle/hf_oracle.py, run in .venv-oracle);
libernie must load them and produce the same logits and greedy continuation. Then libernie writes
checkpoints (HF layout, directly or via a Paddle-layout round trip) and transformers must load them
and agree with libernie.
"""
import json

import numpy as np
import paddle
import pytest

from libernie.checkpoint import convert_checkpoint
from libernie.config import ErnieConfig
from libernie.model import ErnieForCausalLM

from oracle_testlib import IDS, logits as _logits, run_oracle as _oracle

pytestmark = pytest.mark.oracle
TOL = 1e-5

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, initializer_range=0.08, rope_theta=10000.0)
CASES = {
    # name: config overrides. Cover GQA ratio 1 and >= 4, head_dim != hidden/heads, tied/untied, depth, bias.
    "mha_tied_1layer": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=1),
    "gqa4_headdim_ne": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=12, tie_word_embeddings=False),
    "mqa8_3layers": dict(num_attention_heads=8, num_key_value_heads=1, head_dim=32, num_hidden_layers=3),
    "bias_untied": dict(use_bias=True, tie_word_embeddings=False, hidden_size=48, head_dim=20),
    "ernie_0_3b_shape_small": dict(hidden_size=128, intermediate_size=384, num_attention_heads=16, num_key_value_heads=2,
                                   head_dim=16, rope_theta=500000.0, num_hidden_layers=2),
}



@pytest.fixture(scope="session")
def hf_models(oracle_python, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    spec = [{"name": n, "seed": i, "config": {**_BASE, **over}, "input_ids": IDS.tolist(),
             "generate": {"prompt_len": 6, "new_tokens": 8}, "max_shard_size": "40KB"}
            for i, (n, over) in enumerate(CASES.items())]
    (root / "spec.json").write_text(json.dumps(spec))
    _oracle(oracle_python, "build", str(root / "spec.json"), str(root))
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_loads_with_same_logits(hf_models, case):
    d = hf_models / case
    assert len(json.load(open(d / "model.safetensors.index.json"))["weight_map"]) > 0
    model = ErnieForCausalLM.from_pretrained(d)
    ref = np.load(d / "ref_logits.npy")
    assert np.abs(ref).max() > 0.5, "logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(_logits(model), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_continuation_matches_transformers(hf_models, case):
    model = ErnieForCausalLM.from_pretrained(hf_models / case)
    ours = model.generate(IDS[0, :6].tolist(), max_new_tokens=8, eos_token_id=-1)[0]
    assert ours == np.load(hf_models / case / "ref_greedy.npy").tolist()


@pytest.fixture(scope="session")
def libernie_written(oracle_python, hf_models, tmp_path_factory):
    """Checkpoints libernie wrote in the HF layout, plus the logits libernie computes for them."""
    root = tmp_path_factory.mktemp("ours")
    cases = []
    for name in CASES:  # save_pretrained(hf) directly, and via the Paddle layout with convert_checkpoint
        model = ErnieForCausalLM.from_pretrained(hf_models / name)
        model.save_pretrained(root / f"{name}-hf", layout="hf", max_shard_size="30KB")
        model.save_pretrained(root / f"{name}-pd", layout="paddle")
        convert_checkpoint(root / f"{name}-pd", root / f"{name}-pd2hf", layout="hf")
        cases += [(f"{name}-hf", _logits(model)), (f"{name}-pd2hf", _logits(model))]
    paddle.seed(7)  # a model libernie built from scratch: its own config.json, never seen by transformers
    scratch = ErnieForCausalLM(ErnieConfig(**{**_BASE, "num_attention_heads": 6, "num_key_value_heads": 3,
                                              "head_dim": 10, "initializer_range": 0.1}))
    scratch.save_pretrained(root / "scratch-hf", layout="hf")
    cases.append(("scratch-hf", _logits(scratch)))
    spec = [{"dir": str(root / n), "input_ids": IDS.tolist()} for n, _ in cases]
    (root / "spec.json").write_text(json.dumps(spec))
    _oracle(oracle_python, "run", str(root / "spec.json"))
    return root, dict(cases)


def test_transformers_loads_what_libernie_wrote(libernie_written):
    root, ours = libernie_written
    assert len(ours) == 2 * len(CASES) + 1
    for name, logits in ours.items():
        np.testing.assert_allclose(np.load(root / name / "ref_logits.npy"), logits, rtol=0, atol=TOL,
                                   err_msg=name)


@pytest.mark.slow
def test_real_0_3b_architecture_with_transformers_defaults(oracle_python, tmp_path):
    """transformers' default Ernie4_5Config *is* ERNIE-4.5-0.3B (vocab 103424, hidden 1024, 16/2 heads of 128);
    two of its 18 layers keep this under a minute. Our preset must agree with it field by field."""
    from libernie.config import ernie_4_5_0_3b
    spec = [{"name": "b", "seed": 0, "config": {"num_hidden_layers": 2},
             "input_ids": [[1, 5, 9, 22, 100, 2999, 3, 7, 50000, 103000, 17, 18, 19, 20, 21, 22]]}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    _oracle(oracle_python, "build", str(tmp_path / "spec.json"), str(tmp_path))
    model = ErnieForCausalLM.from_pretrained(tmp_path / "b")
    expect = ernie_4_5_0_3b()
    expect.num_hidden_layers = 2
    got = model.config
    assert {f: getattr(got, f) for f in expect.__dataclass_fields__ if f not in ("extra", "source_keys")} == \
           {f: getattr(expect, f) for f in expect.__dataclass_fields__ if f not in ("extra", "source_keys")}
    ref = np.load(tmp_path / "b" / "ref_logits.npy")
    np.testing.assert_allclose(_logits(model, np.array(spec[0]["input_ids"])), ref, rtol=0, atol=TOL)
