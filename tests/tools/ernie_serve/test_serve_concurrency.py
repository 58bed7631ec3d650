"""Continuous batching under load: seeded output alone == in a crowd, queue limit, disconnects, a mixed load."""
from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from serve_testlib import metric


def _body(i: int) -> tuple[str, dict]:
    """Request i of the concurrency test: different seeds, lengths, endpoints, stream or not."""
    common = {"max_tokens": 4 + 3 * i, "temperature": 0.9, "top_p": 0.95, "seed": 1000 + 17 * i,
              "stream": i % 3 == 0}
    if i % 2:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"Tell me about {i}"}]}
    return "/v1/completions", {**common, "prompt": "word " * (1 + i % 5) + str(i), "ignore_eos": i % 4 == 0}


async def _ask(client: httpx.AsyncClient, path: str, body: dict) -> tuple[str, int]:
    """(text, completion_tokens) of one request, streamed or not."""
    if not body.get("stream"):
        r = await client.post(path, json=body)
        r.raise_for_status()
        j = r.json()
        c = j["choices"][0]
        return c.get("text", c.get("message", {}).get("content")), j["usage"]["completion_tokens"]
    body = {**body, "stream_options": {"include_usage": True}}
    parts, usage = [], None
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            for c in chunk["choices"]:
                parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
            usage = chunk.get("usage") or usage
    return "".join(parts), usage["completion_tokens"]


def test_16_concurrent_seeded_requests_match_alone(server, ref_model, tok):
    reqs = [_body(i) for i in range(16)]

    async def run(concurrent: bool):
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as c:
            if concurrent:
                return await asyncio.gather(*(_ask(c, p, b) for p, b in reqs))
            return [await _ask(c, p, b) for p, b in reqs]

    alone = asyncio.run(run(False))
    before = server.metrics()
    together = asyncio.run(run(True))
    after = server.metrics()
    assert together == alone
    # They really shared the batch: some decode steps ran more than one sequence, none more than 4.
    steps = metric(after, "ernie_serve_decode_batch_size_count") - metric(before, "ernie_serve_decode_batch_size_count")
    single = (metric(after, "ernie_serve_decode_batch_size_bucket", le="1.0")
              - metric(before, "ernie_serve_decode_batch_size_bucket", le="1.0"))
    upto4 = (metric(after, "ernie_serve_decode_batch_size_bucket", le="4.0")
             - metric(before, "ernie_serve_decode_batch_size_bucket", le="4.0"))
    assert steps > 0 and single < steps / 2 and upto4 == steps
    # and alone equals libernie.generate for the completions (the independent truth)
    for (path, body), (text, n_out) in zip(reqs, alone):
        if path != "/v1/completions":
            continue
        out = ref_model.generate([tok.encode(body["prompt"])], max_new_tokens=body["max_tokens"], temperature=0.9,
                                 top_p=0.95, seed=body["seed"], eos_token_id=-1 if body["ignore_eos"] else tok.eos_id)[0]
        stopped = not body["ignore_eos"] and out[-1] == tok.eos_id
        assert text == tok.decode(out[:-1] if stopped else out, skip_special_tokens=True)
        assert n_out == len(out)


def test_queue_limit_answers_429(small_server):
    """max-batch 1, max-waiting 1: one runs, one waits, the third is turned away; the server goes on."""
    s = small_server
    long = {"prompt": "go", "max_tokens": 1500, "ignore_eos": True, "stream": True}

    async def scenario():
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            async with c.stream("POST", "/v1/completions", json=long) as first:
                lines = first.aiter_lines()          # keep a reference: a collected iterator closes the stream
                await lines.__anext__()                                # running
                second = asyncio.ensure_future(c.post("/v1/completions", json={**long, "stream": False}))
                for _ in range(200):                                   # until the second is queued
                    await asyncio.sleep(0.01)
                    if "ernie_serve_num_requests_waiting 1.0" in (await c.get("/metrics")).text:
                        break
                third = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                second.cancel()
            return third

    third = asyncio.run(scenario())
    assert third.status_code == 429, third.text
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    ok = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and httpx.get(s.url + "/health").status_code == 200


def test_bf16_paddle_checkpoint_serves_like_generate(small_server, ckpt_bf16_paddle, tok):
    from libernie.model import ErnieForCausalLM
    model = ErnieForCausalLM.from_pretrained(ckpt_bf16_paddle)
    r = httpx.post(small_server.url + "/v1/completions", timeout=60,
                   json={"prompt": "Paddle layout", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    out = model.generate([tok.encode("Paddle layout")], max_new_tokens=12, temperature=0.0, eos_token_id=-1)[0]
    assert r.json()["choices"][0]["text"] == tok.decode(out, skip_special_tokens=True)
    assert r.json()["model"] == "tiny-paddle-bf16"


def _one_more_abort(server, before):
    """Poll /metrics until one more sequence finished as aborted; check the slot is free. Returns the metrics."""
    aborted = metric(before, "ernie_serve_sequences_finished_total", finish_reason="abort")
    for _ in range(100):
        after = server.metrics()
        if metric(after, "ernie_serve_sequences_finished_total", finish_reason="abort") > aborted:
            break
        time.sleep(0.05)
    assert metric(after, "ernie_serve_sequences_finished_total", finish_reason="abort") == aborted + 1
    assert metric(after, "ernie_serve_num_requests_running") == 0
    return after


def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics()
    body = {"prompt": "keep going", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers, timeout=30) as r:
        next(r.iter_lines())                                           # one chunk, then hang up
    after = _one_more_abort(server, before)
    generated = metric(after, "ernie_serve_generation_tokens_total") - metric(before, "ernie_serve_generation_tokens_total")
    assert generated < 480


@pytest.mark.slow
def test_load_200_requests_mixed_with_bad_ones_and_disconnects(server):
    """200 requests at concurrency 16: good ones, malformed ones, and clients that hang up. Nothing 5xx,
    /health stays 200 throughout, and the batch is empty afterwards."""
    rng = random.Random(0)
    kinds = [rng.choice(["good", "good", "good", "stream", "bad_json", "bad_role", "zero_tokens", "wrong_model",
                         "disconnect"]) for _ in range(200)]
    statuses, health = [], []

    async def one(c: httpx.AsyncClient, sem: asyncio.Semaphore, i: int, kind: str):
        async with sem:
            good = {"prompt": f"load {i}", "max_tokens": 4 + i % 20, "temperature": 0.7, "seed": i}
            if kind == "good":
                statuses.append((kind, (await c.post("/v1/completions", json=good)).status_code))
            elif kind in ("stream", "disconnect"):
                async with c.stream("POST", "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 60, "stream": True}) as r:
                    statuses.append((kind, r.status_code))
                    async for line in r.aiter_lines():
                        if kind == "disconnect" and line.startswith("data: {"):
                            break
            elif kind == "bad_json":
                r = await c.post("/v1/completions", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
                statuses.append((kind, r.status_code))
            else:
                body = {"bad_role": {"messages": [{"role": "wizard", "content": "x"}]},
                        "zero_tokens": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
                        "wrong_model": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}[kind]
                statuses.append((kind, (await c.post("/v1/chat/completions", json=body)).status_code))
            if i % 20 == 0:
                health.append((await c.get("/health")).status_code)

    async def run():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as c:
            await asyncio.gather(*(one(c, sem, i, k) for i, k in enumerate(kinds)))

    asyncio.run(asyncio.wait_for(run(), timeout=120))
    expected = {"good": 200, "stream": 200, "disconnect": 200, "bad_json": 400, "bad_role": 400,
                "zero_tokens": 400, "wrong_model": 404}
    assert len(statuses) == 200
    assert all(code == expected[kind] for kind, code in statuses), [x for x in statuses if x[1] != expected[x[0]]]
    assert health and set(health) == {200}
    assert httpx.get(server.url + "/health").status_code == 200
    for _ in range(100):  # aborted rows leave at the next engine step
        m = server.metrics()
        if metric(m, "ernie_serve_num_requests_running") == 0:
            break
    assert metric(m, "ernie_serve_num_requests_running") == 0 and metric(m, "ernie_serve_num_requests_waiting") == 0


def test_disconnect_while_waiting_for_a_whole_response_frees_the_slot(server):
    before = server.metrics()
    body = {"prompt": "keep going", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=0.3)
    _one_more_abort(server, before)
