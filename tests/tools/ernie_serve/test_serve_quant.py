"""ernie-serve on an ernie-quant output whose token embedding is quantized too (wint8 --quantize-embeddings):
the server loads it as stored and its greedy completion is what libernie.generate gives on the same files."""
from __future__ import annotations

import pytest

from serve_testlib import Server


@pytest.fixture(scope="module")
def w8e(ckpt, tmp_path_factory):
    from ernie_quant.api import quantize
    out = tmp_path_factory.mktemp("serve-quant") / "w8e"
    quantize("wint8", str(ckpt), str(out), quantize_embeddings=True)
    return out


def test_serves_a_quantized_embedding_model_and_matches_generate(w8e, tok, tmp_path):
    from libernie.model import ErnieForCausalLM
    from libernie.quant.linear import QuantEmbedding
    model = ErnieForCausalLM.from_pretrained(w8e)
    assert isinstance(model.ernie.embed_tokens, QuantEmbedding)
    ids = tok.encode("The river runs")
    want = model.generate([ids], max_new_tokens=10, temperature=0.0)[0]           # no eos: as ignore_eos
    s = Server(w8e, "--max-model-len", "128", log_dir=tmp_path)
    try:
        r = s.post("/v1/completions", {"prompt": "The river runs", "max_tokens": 10, "temperature": 0,
                                       "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 10
        assert body["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    finally:
        s.stop()
