"""ernie-merge against PEFT: a transformers-made checkpoint with a PEFT adapter (built in .venv-oracle) merges to
the logits PEFT's own merge_and_unload gives, and transformers loads our merged HF output to the same logits."""
import json
import subprocess
from pathlib import Path

import numpy as np
import paddle
import pytest

from ernie_merge.merge import merge
from libernie.checkpoint import CheckpointReader
from libernie.model import ErnieForCausalLM

ORACLE = Path(__file__).with_name("peft_oracle.py")
CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, max_position_embeddings=256, rope_theta=10000.0, use_bias=False)
IDS = np.random.default_rng(0).integers(0, 96, (2, 12)).tolist()
CASES = [
    # untied: every projection, rsLoRA, a per-module alpha (alpha_pattern) and rank (rank_pattern), modules_to_save
    dict(name="untied", seed=1, max_shard_size="40KB", config={**CONFIG, "tie_word_embeddings": False},
         lora=dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3},
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                   "lm_head"], modules_to_save=["norm"])),  # every RMSNorm, saved whole
    # tied, with LoRA on the embedding and the head: the output must be untied (PEFT #2018)
    dict(name="tied", seed=2, config={**CONFIG, "tie_word_embeddings": True},
         lora=dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"])),
]


def _libernie_logits(path):
    m = ErnieForCausalLM.from_pretrained(path)
    with paddle.no_grad():
        return m(paddle.to_tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def peft_cases(tmp_path_factory, oracle_python):
    root = tmp_path_factory.mktemp("peft")
    spec = root / "spec.json"
    spec.write_text(json.dumps([{**c, "input_ids": IDS} for c in CASES]))
    subprocess.run([oracle_python, str(ORACLE), "build", str(spec), str(root)], check=True, capture_output=True)
    return root


@pytest.mark.oracle
@pytest.mark.parametrize("layout", ["hf", "paddle"])
def test_untied_merge_equals_peft_merge_and_unload(peft_cases, tmp_path, layout):
    case = peft_cases / "untied"
    s = merge(case / "base", case / "adapter", tmp_path / "out", layout=layout)
    assert s.adapter_format == "peft" and not s.untied
    # per layer qkv_proj (from 3 adapters), o_proj, up_gate_proj (2), down_proj, 2 norms; lm_head, final norm
    assert s.tensors_merged == 2 * 6 + 2
    peft_merged = np.load(case / "peft_merged_logits.npy")
    np.testing.assert_allclose(_libernie_logits(tmp_path / "out"), peft_merged, atol=1e-5, rtol=0)
    # and the merge is not a no-op: the adapter moved the logits
    assert np.abs(np.load(case / "adapted_logits.npy") - _libernie_logits(case / "base")).max() > 1e-2


@pytest.mark.oracle
def test_tied_embedding_and_head_lora_writes_an_untied_model(peft_cases, tmp_path):
    case = peft_cases / "tied"
    s = merge(case / "base", case / "adapter", tmp_path / "out", layout="paddle")
    assert s.untied
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    r = CheckpointReader(tmp_path / "out")
    head, _ = r.get("lm_head.weight")
    emb, _ = r.get("ernie.embed_tokens.weight")
    assert head.shape == (32, 96) and emb.shape == (96, 32)  # Paddle head is [h, V]
    assert np.abs(head - emb.T).max() > 1e-3  # the two deltas differ, so the copies must too
    # the truth is PEFT's adapted model (embedding delta on the input side only, head delta on the output only)
    np.testing.assert_allclose(_libernie_logits(tmp_path / "out"), np.load(case / "adapted_logits.npy"), atol=1e-5)


@pytest.mark.oracle
def test_transformers_loads_our_hf_output_to_peft_logits(peft_cases, tmp_path, oracle_python):
    spec = []
    for name, truth in (("untied", "peft_merged_logits.npy"), ("tied", "adapted_logits.npy")):
        merge(peft_cases / name / "base", peft_cases / name / "adapter", tmp_path / name, layout="hf")
        spec.append({"dir": str(tmp_path / name), "input_ids": IDS, "truth": str(peft_cases / name / truth)})
    (tmp_path / "run.json").write_text(json.dumps(spec))
    subprocess.run([oracle_python, str(ORACLE), "run", str(tmp_path / "run.json")], check=True, capture_output=True)
    for case in spec:
        np.testing.assert_allclose(np.load(Path(case["dir"]) / "logits.npy"), np.load(case["truth"]), atol=1e-5)
