"""Fixtures for ernie-serve: tiny checkpoints in both layouts, live servers on loopback, a reference model.

The tiny model's weights are redrawn with a larger spread than the default init, so greedy decoding
does not settle on one repeated token and comparisons between outputs mean something.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import libernie  # noqa: F401  (CPU env defaults before paddle)
from serve_testlib import API_KEY, Server

REPO = Path(__file__).resolve().parents[3]


def _build_checkpoint(out: Path, layout: str, dtype: str | None, seed: int = 0) -> Path:
    import numpy as np
    import paddle

    from libernie.config import ernie_tiny
    from libernie.model import ErnieForCausalLM
    from libernie.tokenizer import ErnieTokenizer

    tok = ErnieTokenizer.from_pretrained(REPO / "assets" / "tokenizer")
    paddle.seed(seed)
    model = ErnieForCausalLM(ernie_tiny(vocab_size=tok.vocab_size))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.set_value(rng.normal(0.0, 0.15, p.shape).astype("float32"))
    model.save_pretrained(out, layout=layout, dtype=dtype)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tok():
    from libernie.tokenizer import ErnieTokenizer
    return ErnieTokenizer.from_pretrained(REPO / "assets" / "tokenizer")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """fp32, HF layout."""
    return _build_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-hf", "hf", None)


@pytest.fixture(scope="session")
def ckpt_bf16_paddle(tmp_path_factory) -> Path:
    """bf16, Paddle layout (computed in fp32 on CPU)."""
    return _build_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-paddle-bf16", "paddle", "bf16", seed=1)


@pytest.fixture(scope="session")
def ref_model(ckpt):
    """The same checkpoint loaded in this process: the independent truth for server outputs."""
    from libernie.model import ErnieForCausalLM
    return ErnieForCausalLM.from_pretrained(ckpt)


@pytest.fixture(scope="session")
def server(ckpt, tmp_path_factory):
    """The main server: API key on, 4 sequences per batch, 512-token context."""
    s = Server(ckpt, "--max-batch", "4", "--max-model-len", "512", "--served-model-name", "tiny",
               api_key=API_KEY, log_dir=tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def small_server(ckpt_bf16_paddle, tmp_path_factory):
    """One sequence at a time and one waiting: the queue-limit server. bf16 Paddle-layout weights."""
    s = Server(ckpt_bf16_paddle, "--max-batch", "1", "--max-waiting", "1", log_dir=tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
