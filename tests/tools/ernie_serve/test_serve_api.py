"""The OpenAI API of a live ernie-serve, through the `openai` package, checked against in-process
generate() on the same checkpoint and against the tokenizer's own counts."""
from __future__ import annotations

import numpy as np
import openai
import pytest

from serve_testlib import metric

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colours."}]


def reference(ref_model, tok, ids, max_tokens, stops, **kw):
    """(text, completion_tokens, finish_reason) the server must reproduce, from libernie.generate."""
    out = ref_model.generate([ids], max_new_tokens=max_tokens, eos_token_id=tok.eos_id,
                             stop_token_ids=[s for s in stops if s != tok.eos_id], **kw)[0]
    finish = "stop" if out and out[-1] in stops else "length"
    text_ids = out[:-1] if finish == "stop" else out
    return tok.decode(text_ids, skip_special_tokens=True), len(out), finish


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_chat_greedy_equals_generate(client, ref_model, tok):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    ids, _ = tok.encode_chat(CHAT, add_generation_prompt=True)
    text, n_out, finish = reference(ref_model, tok, ids, 24, {tok.eos_id, tok.sep_id}, temperature=0.0)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n_out)
    assert r.usage.total_tokens == len(ids) + n_out


@pytest.mark.parametrize("seed", [7, 12345])
def test_completion_seeded_sampling_equals_generate(client, ref_model, tok, seed):
    prompt = "The river runs"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0.9, top_p=0.95,
                                  seed=seed, extra_body={"top_k": 50})
    ids = tok.encode(prompt)
    text, n_out, finish = reference(ref_model, tok, ids, 20, {tok.eos_id}, temperature=0.9, top_p=0.95,
                                    top_k=50, seed=seed)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n_out)


def test_streaming_chat_concatenates_to_the_whole_reply(client):
    kw = dict(model="tiny", messages=CHAT, max_tokens=30, temperature=0.8, seed=3)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_completion_wire_format(server):
    """Raw SSE: `data: {json}` events and a final `data: [DONE]`."""
    import httpx
    body = {"prompt": "Hello", "max_tokens": 6, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_n_choices_are_seeded_per_index(client, ref_model, tok):
    prompt = "Once upon a time"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=99, n=3)
    ids = tok.encode(prompt)
    outs = ref_model.generate([ids] * 3, max_new_tokens=12, temperature=1.0, seed=99, eos_token_id=tok.eos_id)
    got = sorted(r.choices, key=lambda c: c.index)
    assert [c.index for c in got] == [0, 1, 2]
    for c, out in zip(got, outs):
        ids_text = out[:-1] if out[-1] == tok.eos_id else out
        assert c.text == tok.decode(ids_text, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == sum(len(o) for o in outs)


def test_prompt_list_and_token_ids(client, ref_model, tok):
    prompts = ["red green", "one two three four"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0)
    tokens = client.completions.create(model="tiny", prompt=tok.encode(prompts[1]), max_tokens=8, temperature=0)
    for i, p in enumerate(prompts):
        text, _, _ = reference(ref_model, tok, tok.encode(p), 8, {tok.eos_id}, temperature=0.0)
        assert r.choices[i].text == text
    assert tokens.choices[0].text == r.choices[1].text


def test_stop_string_cuts_the_text(client, server):
    base = dict(model="tiny", prompt="Colours of the sky", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    r = client.completions.create(stop=[stop], **base)
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **base))
    assert streamed == full[: full.find(stop)]


def test_stop_token_ids_end_the_sequence(client, tok):
    base = dict(model="tiny", prompt="abc def", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(logprobs=0, **base)
    ids = [tok.encode(t)[0] if t else None for t in full.choices[0].logprobs.tokens]
    # pick a token that first occurs at position k >= 2 and encodes to itself
    k = next(i for i in range(2, len(ids)) if ids[i] is not None and ids[i] not in ids[:i]
             and tok.decode([ids[i]]) == full.choices[0].logprobs.tokens[i])
    r = client.completions.create(**{**base, "extra_body": {"ignore_eos": True, "stop_token_ids": [ids[k]]}})
    assert r.usage.completion_tokens == k + 1
    assert r.choices[0].finish_reason == "stop"


def test_chat_logprobs_match_the_model(client, ref_model, tok):
    import paddle
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    ids, _ = tok.encode_chat(CHAT, add_generation_prompt=True)
    out = ref_model.generate([ids], max_new_tokens=6, temperature=0.0, eos_token_id=-1)[0]
    logits = ref_model(paddle.to_tensor([ids + out[:-1]])).logits[0, len(ids) - 1:].numpy().astype(np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for t, entry in enumerate(content):
        assert entry.logprob == pytest.approx(lp[t, out[t]], abs=1e-4)
        assert [x.logprob for x in entry.top_logprobs] == sorted((x.logprob for x in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy picks the top


def test_repetition_penalty_equals_generate(client, ref_model, tok):
    r = client.completions.create(model="tiny", prompt="to be or not to be", max_tokens=16, temperature=0,
                                  extra_body={"repetition_penalty": 1.5})
    text, _, _ = reference(ref_model, tok, tok.encode("to be or not to be"), 16, {tok.eos_id}, temperature=0.0,
                           repetition_penalty=1.5)
    assert r.choices[0].text == text


@pytest.mark.parametrize("body, param, code", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "literal_error"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens", "int_type"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p", None),
    ({"messages": []}, "messages", None),
    ({}, "messages", "missing"),
    ({"messages": [{"role": "user", "content": "x " * 600}]}, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}, "max_tokens", "context_length_exceeded"),
])
def test_bad_chat_requests_get_openai_errors(server, body, param, code):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and "\n" not in err["message"]
    if code:
        assert err["code"] == code


def test_malformed_json_is_400(server):
    import httpx
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi",', timeout=10,
                   headers={**server.headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_body_sent_as_form_data_gets_a_hint(server):
    import httpx
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi"}', timeout=10,
                   headers={**server.headers, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


def test_wrong_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_wrong_api_key_is_401(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        c.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}])
def test_missing_api_key_is_401(server, headers):
    import httpx
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_health_and_metrics_need_no_key(server):
    import httpx
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert "ernie_serve_requests_total" in httpx.get(server.url + "/metrics").text


def test_metrics_count_tokens_and_latency(server, client):
    before = server.metrics()
    r1 = client.completions.create(model="tiny", prompt="count me", max_tokens=5, temperature=0)
    r2 = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=7, temperature=0)
    after = server.metrics()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("ernie_serve_prompt_tokens_total") == r1.usage.prompt_tokens + r2.usage.prompt_tokens
    assert delta("ernie_serve_generation_tokens_total") == r1.usage.completion_tokens + r2.usage.completion_tokens
    assert delta("ernie_serve_time_to_first_token_seconds_count") == 2
    assert delta("ernie_serve_e2e_request_latency_seconds_count") == 2
    assert delta("ernie_serve_requests_total", endpoint="/v1/completions", status="200") == 1
    assert metric(after, "ernie_serve_num_requests_running") == 0
    assert metric(after, "ernie_serve_num_requests_waiting") == 0


def test_presence_and_frequency_penalties_equal_a_plain_loop(client, ref_model, tok):
    """Reference: full forward each step (no cache) and libernie.sampling.sample with the same penalties."""
    import paddle

    from libernie.sampling import SamplingParams, sample
    prompt = "the the the cat"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, presence_penalty=1.5,
                                  frequency_penalty=0.7, extra_body={"ignore_eos": True})
    ids, out = tok.encode(prompt), []
    params = SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7)
    for _ in range(10):
        logits = ref_model(paddle.to_tensor([ids + out])).logits[0, -1].numpy()
        out.append(sample(logits, params, None, seen=np.asarray(ids + out), generated=np.asarray(out, dtype=np.int64)))
    assert r.choices[0].text == tok.decode(out, skip_special_tokens=True)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].text != r.choices[0].text  # the penalties did something


def test_multi_turn_chat_uses_the_training_tokenization(client, tok):
    messages = [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell a joke"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    as_system = [{"role": "system", "content": "Be kind."}, *messages[1:]]
    assert r.usage.prompt_tokens == len(tok.encode_chat(as_system, add_generation_prompt=True)[0])


def test_echo_prepends_the_prompt(client):
    a = client.completions.create(model="tiny", prompt="Echo this", max_tokens=4, temperature=0)
    b = client.completions.create(model="tiny", prompt="Echo this", max_tokens=4, temperature=0, echo=True)
    assert b.choices[0].text == "Echo this" + a.choices[0].text
