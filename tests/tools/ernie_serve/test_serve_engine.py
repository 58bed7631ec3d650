"""The engine in-process: batch cache bookkeeping, stop-string holding, join/leave, errors, the loading phase."""
from __future__ import annotations

import threading

import numpy as np
import paddle
import pytest

from ernie_serve.engine import BatchCache, Engine, GenParams, QueueFull, Request, _find_stop, _safe_prefix
from libernie.sampling import SamplingParams


def _run(engine: Engine, specs: list[tuple[list[int], GenParams, int]], timeout=60) -> dict:
    """Submit (prompt, params, n) requests together; return {(request, index): (token ids, text, finish)}."""
    out, lock, done = {}, threading.Lock(), threading.Event()
    left = [sum(n for _, _, n in specs)]

    def make_cb(k):
        def cb(ev):
            with lock:
                ids, text, _ = out.get((k, ev.index), ([], "", None))
                out[(k, ev.index)] = (ids + ev.token_ids, text + ev.text, ev.finish_reason)
                if ev.finish_reason:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return cb

    engine.submit([Request(p, gp, n, 0, make_cb(k)) for k, (p, gp, n) in enumerate(specs)])
    assert done.wait(timeout)
    return out


@pytest.fixture(scope="module")
def engine(ref_model, tok):
    e = Engine(ref_model, tok, max_batch=3, max_waiting=8).start()
    yield e
    e.shutdown()


def test_safe_prefix_holds_back_possible_stop_starts_and_partial_utf8():
    assert _safe_prefix("hello wor", ("world",)) == len("hello ")
    assert _safe_prefix("hello", ("xyz",)) == 5
    assert _safe_prefix("ab\ufffd", ()) == 2
    assert _safe_prefix("abcd", ("dx", "cdy")) == 2          # the longest held-back tail wins
    assert _find_stop("one two three", ("two", "three"), 0) == 4
    assert _find_stop("one two", ("two",), 7) is None           # only text not yet sent is searched... 
    assert _find_stop("one two", ("two",), 5) == 4              # ...but a stop may straddle the sent part


def test_batch_cache_merge_pads_left_and_keep_trims():
    c = BatchCache(1)
    a = paddle.ones([1, 1, 3, 2])                    # [rows, nkv, positions, hd]: libernie's head-major cache
    b = paddle.full([2, 1, 5, 2], 2.0)
    c.merge(type("C", (), {"keys": [a], "values": [a]})())
    c.merge(type("C", (), {"keys": [b], "values": [b]})())
    k = c.keys[0].numpy()
    assert k.shape == (3, 1, 5, 2) and (k[0, :, :2] == 0).all() and (k[0, :, 2:] == 1).all() and (k[1:] == 2).all()
    assert c.seq_len == 5
    c.keep([0], first_col=2)
    assert c.keys[0].shape == [1, 1, 3, 2] and (c.keys[0].numpy() == 1).all()


def test_rows_join_and_leave_without_changing_outputs(engine, ref_model, tok):
    """7 requests through 3 slots: they queue, join mid-flight, finish at different steps."""
    prompts = [tok.encode(t) for t in ["a", "bb cc", "the long prompt here", "x", "y z", "quick", "fox jumps"]]
    params = [GenParams(max_tokens=3 + 4 * i, sampling=SamplingParams(temperature=0.8, top_k=30), seed=i,
                        stop_token_ids=frozenset({tok.eos_id})) for i in range(7)]
    together = _run(engine, [(p, gp, 1) for p, gp in zip(prompts, params)])
    for i, (p, gp) in enumerate(zip(prompts, params)):
        ref = ref_model.generate([p], max_new_tokens=gp.max_tokens, temperature=0.8, top_k=30, seed=i,
                                 eos_token_id=tok.eos_id)[0]
        assert together[(i, 0)][0] == ref


def test_queue_full_raises(ref_model, tok):
    e = Engine(ref_model, tok, max_batch=1, max_waiting=2)   # not started: nothing leaves the queue
    gp = GenParams(max_tokens=2)
    e.submit([Request([5], gp, 2, 0, lambda ev: None)])
    with pytest.raises(QueueFull):
        e.submit([Request([5], gp, 1, 0, lambda ev: None)])


def test_a_client_that_leaves_while_waiting_gives_its_place_back(ref_model, tok):
    e = Engine(ref_model, tok, max_batch=1, max_waiting=2)   # not started: nothing leaves the queue
    gp = GenParams(max_tokens=2)
    events = []
    gone = Request([5], gp, 2, 0, events.append)
    e.submit([gone])
    gone.abort()
    e.submit([Request([5], gp, 2, 0, lambda ev: None)])      # would be QueueFull if `gone` still counted
    assert [ev.finish_reason for ev in events] == ["abort", "abort"] and e.num_waiting == 1


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(ref_model, tok):
    class Flaky:
        config = ref_model.config
        calls = 0

        def __call__(self, *a, **kw):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise RuntimeError("boom")
            return ref_model(*a, **kw)

    e = Engine(Flaky(), tok, max_batch=2).start()
    try:
        gp = GenParams(max_tokens=5, sampling=SamplingParams(temperature=0.0), stop_token_ids=frozenset())
        first = _run(e, [([5, 6], gp, 1)])
        assert first[(0, 0)][2] == "error"
        again = _run(e, [([5, 6], gp, 1)])
        assert again[(0, 0)][2] == "length" and len(again[(0, 0)][0]) == 5
    finally:
        e.shutdown()


def test_health_is_503_while_loading_then_200(ckpt, tok, monkeypatch):
    from fastapi.testclient import TestClient

    from ernie_serve.api import ServeConfig, create_app
    from libernie.config import ErnieConfig
    from libernie.model import ErnieForCausalLM

    gate = threading.Event()
    real = ErnieForCausalLM.from_pretrained.__func__

    def slow_load(cls, path, dtype=None):
        gate.wait(30)
        return real(cls, path, dtype)

    monkeypatch.setattr(ErnieForCausalLM, "from_pretrained", classmethod(slow_load))
    app = create_app(ServeConfig(str(ckpt)), tokenizer=tok, model_config=ErnieConfig.from_file(ckpt))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json() == {"status": "loading"}
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        gate.set()
        for _ in range(300):
            if c.get("/health").status_code == 200:
                break
            threading.Event().wait(0.02)
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_load_failure_is_reported(tmp_path, ckpt, tok):
    from fastapi.testclient import TestClient

    from ernie_serve.api import ServeConfig, create_app
    from libernie.config import ErnieConfig

    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    shard = next(bad.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:200])              # truncated weights
    errors = []
    app = create_app(ServeConfig(str(bad)), tokenizer=tok, model_config=ErnieConfig.from_file(bad),
                     on_load_error=errors.append)
    with TestClient(app) as c:
        for _ in range(300):
            if errors:
                break
            threading.Event().wait(0.02)
        assert errors and "\n" not in errors[0] and str(bad) in errors[0]
        assert c.get("/health").json() == {"status": "failed"}


def test_logprobs_are_log_softmax_of_the_raw_logits():
    from ernie_serve.engine import _logprobs
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    lp = _logprobs(logits, 2, 2)
    ref = logits - np.log(np.exp(logits).sum())
    assert lp["logprob"] == pytest.approx(ref[2]) and [t for t, _ in lp["top"]] == [1, 2]
