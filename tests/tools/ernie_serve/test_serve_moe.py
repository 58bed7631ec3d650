"""ernie-serve serves an MoE checkpoint with no tool changes (the one loading path, from_pretrained):
concurrent greedy completions, batched together, equal libernie.generate on each prompt alone."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serve_testlib import Server

REPO = Path(__file__).resolve().parents[3]

PROMPTS = ["Hello there", "Name three colours of the rainbow, please", "1 2 3"]


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    import paddle

    from libernie.config import ernie_tiny_moe
    from libernie.model import ErnieForCausalLM
    from libernie.model.moe import moe_blocks
    from libernie.tokenizer import ErnieTokenizer

    tok = ErnieTokenizer.from_pretrained(REPO / "assets" / "tokenizer")
    paddle.seed(0)
    model = ErnieForCausalLM(ernie_tiny_moe(vocab_size=tok.vocab_size))
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters():  # a wider spread than the init, so greedy output varies
        if "norm" not in name and "moe_statics" not in name:
            p.set_value(rng.normal(0.0, 0.15, p.shape).astype("float32"))
    for blk in moe_blocks(model):
        blk.moe_statics.e_score_correction_bias.set_value(rng.normal(0, 0.05, (1, blk.num_experts)).astype("float32"))
    out = tmp_path_factory.mktemp("serve_moe") / "tiny-moe"
    model.save_pretrained(out, layout="paddle", dtype="bf16")
    tok.save_pretrained(out)
    return out, tok


def test_moe_checkpoint_serves_batched_greedy_equal_to_generate(moe_ckpt, tmp_path):
    from libernie.model import ErnieForCausalLM

    d, tok = moe_ckpt
    ref = ErnieForCausalLM.from_pretrained(d)
    server = Server(d, "--max-batch", "4", "--max-model-len", "256", log_dir=tmp_path)
    try:
        body = lambda p: {"prompt": p, "max_tokens": 12, "temperature": 0}  # noqa: E731
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            replies = list(pool.map(lambda p: server.post("/v1/completions", body(p)), PROMPTS))
    finally:
        assert server.stop() == 0
    lengths = []
    for prompt, r in zip(PROMPTS, replies):
        assert r.status_code == 200, r.text
        ids = tok.encode(prompt)
        out = ref.generate([ids], max_new_tokens=12, eos_token_id=tok.eos_id)[0]
        text = tok.decode(out[:-1] if out and out[-1] == tok.eos_id else out, skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == text
        assert r.json()["usage"]["completion_tokens"] == len(out)
        lengths.append(len(out))
    assert max(lengths) >= 6, "outputs too short for the comparison to mean anything"
