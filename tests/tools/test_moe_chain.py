"""The whole chain on a tiny MoE, through each tool's Python API or CLI: ernie-pack -> ernie-train pretrain
-> ernie-train sft --lora (routed + shared experts) -> ernie-merge -> ernie-quant wint8 -> ernie-serve.
Each hand-off is checked against an independent value: merged == base + adapter, the quantized model is
close to the merged one with the router untouched, and the server's greedy text == libernie.generate."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import paddle
from click.testing import CliRunner

from ernie_merge.merge import merge
from ernie_pack.api import PackOptions, pack
from ernie_quant.api import quantize
from ernie_train.cli import cli as train_cli
from libernie.checkpoint import CheckpointReader
from libernie.model import ErnieForCausalLM
from libernie.tokenizer import ErnieTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")
IDS = [[1, 50, 60, 70, 80, 90, 100, 7]]


def _jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _logits(model):
    with paddle.no_grad():
        return model(paddle.to_tensor(IDS)).logits.numpy()


def _train(*args):
    r = CliRunner().invoke(train_cli, [*args, "-q"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_pack_pretrain_lora_merge_quant_serve(tmp_path):
    lines = [ln.strip() for ln in open(os.path.join(ROOT, "assets", "corpus", "stories.txt")) if ln.strip()][:150]
    _jsonl(tmp_path / "pt.jsonl", [{"text": t} for t in lines])
    _jsonl(tmp_path / "sft.jsonl", [{"src": [f"What is {a} + {b}?"], "tgt": [str(a + b)]} for a in range(8) for b in range(8)])
    for mode in ("pretrain", "sft"):
        pack(PackOptions(mode=mode, tokenizer=TOKENIZER, seq_len=64, output=str(tmp_path / mode),
                         inputs=[str(tmp_path / f"{'pt' if mode == 'pretrain' else 'sft'}.jsonl")]))
    base = _train("pretrain", "--data", str(tmp_path / "pretrain"), "--init-config", "ernie-tiny-moe", "--tokenizer",
                  TOKENIZER, "-o", str(tmp_path / "pt"), "--max-steps", "3", "--learning-rate", "3e-3")["checkpoint"]
    adapter = _train("sft", "--data", str(tmp_path / "sft"), "--model", base, "--lora", "--lora-rank", "4",
                     "--lora-target-modules", "qkv_proj,experts.up_gate_proj,experts.down_proj,shared_experts.down_proj",
                     "-o", str(tmp_path / "sft-run"), "--max-steps", "3", "--learning-rate", "2e-2")["checkpoint"]

    merged = tmp_path / "merged"
    summary = merge(base, adapter, merged)
    assert summary.tensors_merged == 3 + 2 * (8 * 2 + 1)           # qkv x 3 layers; 2 MoE layers' experts + shared
    want = _logits(ErnieForCausalLM.from_pretrained(base, adapter=adapter))
    np.testing.assert_allclose(_logits(ErnieForCausalLM.from_pretrained(merged)), want, atol=1e-5, rtol=0)
    assert np.abs(want - _logits(ErnieForCausalLM.from_pretrained(base))).max() > 1e-3   # the adapter did something

    q8 = tmp_path / "q8"
    assert quantize("wint8", str(merged), str(q8)).quantized == 44
    qr, mr = CheckpointReader(q8), CheckpointReader(merged)
    assert mr.layout == "hf" and qr.layout == "paddle"              # FastDeploy's layout: gate [h, E], not [E, h]
    for n, t in (("layers.1.mlp.gate.weight", np.transpose), ("layers.2.mlp.moe_statics.e_score_correction_bias", np.asarray)):
        assert qr.get("ernie." + n)[1] == mr.get("model." + n)[1] == "F32"
        np.testing.assert_array_equal(np.asarray(qr.get("ernie." + n)[0]), t(np.asarray(mr.get("model." + n)[0])))
    assert "ernie.layers.2.mlp.experts.7.down_proj.quant_weight" in qr
    quant = ErnieForCausalLM.from_pretrained(q8)
    d = np.abs(_logits(quant) - want).max()
    assert 1e-6 < d < 5e-2

    tok = ErnieTokenizer.from_pretrained(q8)
    prompt = "What is 2 + 3?"
    ref = quant.generate([tok.encode(prompt)], max_new_tokens=6, eos_token_id=tok.eos_id)[0]
    ref_text = tok.decode(ref[:-1] if ref and ref[-1] == tok.eos_id else ref, skip_special_tokens=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "ernie-serve")
    proc = subprocess.Popen([exe, str(q8), "--port", str(port), "-q"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "serve.err", "wb"), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.err").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ernie-serve did not become healthy"
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": prompt, "max_tokens": 6, "temperature": 0})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref_text
    assert r.json()["usage"]["completion_tokens"] == len(ref) >= 1
