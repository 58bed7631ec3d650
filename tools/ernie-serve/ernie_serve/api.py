"""The FastAPI app: OpenAI endpoints over the Engine, /health, /metrics.

The model loads on a thread after the server starts listening, so /health can answer 503 while it
loads. Each HTTP request becomes one engine Request per prompt; the engine thread hands events to
this event loop through `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ernie_serve import responses
from ernie_serve.engine import Engine, GenParams, QueueFull
from ernie_serve.engine import Request as EngineRequest
from ernie_serve.metrics import Metrics
from ernie_serve.protocol import (ChatCompletionRequest, CompletionRequest, OpenAIError, bad_request,
                                  prompt_list, validation_error)

log = logging.getLogger("ernie_serve")


@dataclass
class ServeConfig:
    """Everything `ernie-serve` is told. max_model_len None: the model's max_position_embeddings."""
    model_dir: str
    served_model_name: str | None = None
    tokenizer: str | None = None        # default: model_dir
    max_batch: int = 8
    max_waiting: int = 64
    max_model_len: int | None = None
    api_key: str | None = None

    @property
    def name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.abspath(self.model_dir))


class ServerState:
    """Model, tokenizer and engine; `ready` once loaded. `error` holds a load failure."""

    def __init__(self, cfg: ServeConfig, tokenizer, model_config, on_load_error: Callable[[str], None] | None):
        self.cfg, self.tok, self.model_config = cfg, tokenizer, model_config
        self.max_model_len = cfg.max_model_len or model_config.max_position_embeddings
        self.engine: Engine | None = None
        self.error: str | None = None
        self.metrics = Metrics()
        self._on_load_error = on_load_error
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def load(self, model=None) -> None:
        """Load the checkpoint (the one path: ErnieForCausalLM.from_pretrained), warm up, start the engine."""
        try:
            import paddle
            from libernie.model import ErnieForCausalLM
            if model is None:
                model = ErnieForCausalLM.from_pretrained(self.cfg.model_dir)
            with paddle.no_grad():  # the first forward pays one-off kernel set-up; keep it out of TTFT
                model(paddle.to_tensor([[self.tok.bos_id]], dtype="int64"))
            engine = Engine(model, self.tok, max_batch=self.cfg.max_batch, max_waiting=self.cfg.max_waiting,
                            on_step=self.metrics.batch_size.observe)
            self.metrics.watch_engine(engine)
            self.engine = engine.start()
            log.info("model %s ready", self.cfg.name)
        except Exception as e:  # reported through /health and on_load_error; the CLI exits 1
            self.error = f"{self.cfg.model_dir}: {e}"
            log.error("loading failed: %s", self.error)
            if self._on_load_error:
                self._on_load_error(self.error)

    def require_ready(self) -> Engine:
        if self.engine is None:
            raise OpenAIError(503, "the model is still loading; poll GET /health", type="server_error",
                              code="model_loading")
        return self.engine


def create_app(cfg: ServeConfig, *, tokenizer, model_config, model=None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app. `model` (optional) skips loading from disk, for tests and in-process use."""
    state = ServerState(cfg, tokenizer, model_config, on_load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, args=(model,), name="ernie-serve-load", daemon=True).start()
        yield
        if state.engine is not None:  # uvicorn has drained the open requests by now
            state.engine.shutdown()

    app = FastAPI(title="ernie-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    app.add_middleware(_CountRequests, metrics=state.metrics)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        err = validation_error(errors)
        if errors and tuple(errors[0].get("loc", ())) == ("body",):
            ctype = request.headers.get("content-type", "")
            hint = "" if "json" in ctype else f"; it was sent as {ctype or 'no content type'}, send " \
                                               "'Content-Type: application/json'"
            err = bad_request(f"the request body must be a JSON object{hint}", code="invalid_body")
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        err = OpenAIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # logged with its traceback; the server goes on
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        err = OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    async def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), cfg.api_key.encode()):
            what = "missing API key; send 'Authorization: Bearer KEY'" if not got else "incorrect API key"
            raise OpenAIError(401, what, type="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != cfg.name:
            raise OpenAIError(404, f"model {name!r} does not exist; this server serves {cfg.name!r}",
                              param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if state.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "failed" if state.error else "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": cfg.name, "object": "model", "created": state.created,
                                            "owned_by": "ernie-tools", "max_model_len": state.max_model_len}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        engine = state.require_ready()
        check_model(body.model)
        prompts = [_token_ids(state, p) for p in prompt_list(body.prompt)]
        if body.echo and body.stream:
            raise bad_request("echo is not supported with stream", param="echo")
        params = _gen_params(state, body, prompts, body.max_tokens, body.logprobs, chat=False)
        return await _serve(state, engine, request, body, prompts, params, responses.CompletionFormat(
            state.tok, cfg.name, body, prompts))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = state.require_ready()
        check_model(body.model)
        ids, _ = state.tok.encode_chat(body.rendered_messages(), add_generation_prompt=True)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = _gen_params(state, body, [ids], body.limit(), top, chat=True)
        return await _serve(state, engine, request, body, [ids], params,
                            responses.ChatFormat(state.tok, cfg.name, body))

    return app


def _token_ids(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, str):
        return state.tok.encode(prompt)
    if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
        raise bad_request("prompt must be a string, a list of strings, or token ids", param="prompt")
    vocab = state.model_config.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)


def _gen_params(state: ServerState, body, prompts: list[list[int]], max_tokens: int | None,
                logprobs: int | None, chat: bool) -> GenParams:
    longest = max(len(p) for p in prompts)
    if any(len(p) == 0 for p in prompts):
        raise bad_request("prompt is empty; it must encode to at least one token", param="prompt")
    room = state.max_model_len - longest
    if room <= 0:
        raise bad_request(f"the prompt has {longest} tokens; this model takes at most {state.max_model_len} "
                          "(--max-model-len) including the output", param="messages" if chat else "prompt",
                          code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise bad_request(f"max_tokens={max_tokens} plus the prompt's {longest} tokens exceeds the model's "
                          f"{state.max_model_len} (--max-model-len)", param="max_tokens",
                          code="context_length_exceeded")
    sampling = body.sampling()
    try:
        sampling.validate()
    except ValueError as e:
        raise bad_request(str(e)) from None
    stop_ids = set(body.stop_token_ids or ())
    if not body.ignore_eos:
        stop_ids.add(state.model_config.eos_token_id)
        if chat:  # a chat reply ends with <|end_of_sentence|>
            stop_ids.add(state.tok.sep_id)
    return GenParams(max_tokens=max_tokens, sampling=sampling, seed=body.seed, stop=body.stops(),
                     stop_token_ids=frozenset(stop_ids), logprobs=logprobs)


class _Run:
    """The engine requests of one HTTP request and the queue their events arrive on."""

    def __init__(self, state: ServerState, prompts, params: GenParams, n: int):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs = [EngineRequest(ids, params, n, i * n, self._on_event) for i, ids in enumerate(prompts)]
        self.left = n * len(prompts)
        self.accounted = False

    def _on_event(self, ev) -> None:  # engine thread; counted here so hung-up clients are counted too
        if ev.finish_reason is not None:
            self.state.metrics.finished.labels(ev.finish_reason).inc()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    async def events(self):
        while self.left:
            ev = await self.queue.get()
            if ev.finish_reason is not None:
                self.left -= 1
            yield ev
        self.account()

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.reqs)
        completion = sum(r.completion_tokens for r in self.reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def account(self) -> None:
        if self.accounted:
            return
        self.accounted = True
        m, now = self.state.metrics, time.monotonic()
        for r in self.reqs:
            m.prompt_tokens.inc(len(r.prompt_ids))
            m.generation_tokens.inc(r.completion_tokens)
            if r.first_token_at is not None:
                m.ttft.observe(r.first_token_at - r.arrival)
                m.latency.observe(now - r.arrival)

    def abort(self) -> None:
        for r in self.reqs:
            r.abort()


async def _serve(state, engine: Engine, request: Request, body, prompts, params, fmt):
    run = _Run(state, prompts, params, body.n)
    try:
        engine.submit(run.reqs)
    except QueueFull as e:
        raise OpenAIError(429, f"server busy: {e}; retry later", type="rate_limit_error",
                          code="rate_limit_exceeded") from None
    if body.stream:
        return StreamingResponse(_stream(run, fmt, body.include_usage()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    watcher = asyncio.ensure_future(_abort_on_disconnect(request, run))
    try:
        async for ev in run.events():
            if ev.finish_reason == "error":
                raise OpenAIError(500, f"generation failed: {ev.error}", type="server_error", code="engine_error")
            if ev.finish_reason == "abort" and not run.left:
                raise OpenAIError(503, "the request was aborted (client gone or server shutting down)",
                                  type="server_error", code="aborted")
            fmt.add(ev)
    finally:
        watcher.cancel()
        run.abort()       # no-op when all finished; frees the slots if this handler is cancelled
        run.account()
    return Response(orjson.dumps(fmt.final(run.usage())), media_type="application/json")


async def _abort_on_disconnect(request: Request, run: _Run) -> None:
    """A non-streaming client that hangs up frees its slots too. The body has been read, so the
    next ASGI message is http.disconnect."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            run.abort()
            return


async def _stream(run: _Run, fmt, include_usage: bool):
    """SSE: `data: {chunk}` lines, an optional usage chunk, then `data: [DONE]`. If the client goes
    away, Starlette stops iterating this generator and `finally` aborts the engine requests."""
    try:
        for chunk in fmt.head():
            yield _sse(chunk, include_usage)
        async for ev in run.events():
            if ev.finish_reason == "error":
                yield _sse(OpenAIError(500, f"generation failed: {ev.error}", type="server_error",
                                       code="engine_error").body(), False)
                break
            chunk = fmt.chunk(ev)
            if chunk is not None:
                yield _sse(chunk, include_usage)
        if include_usage:
            yield _sse(fmt.usage_chunk(run.usage()), False)
        yield b"data: [DONE]\n\n"
    finally:
        run.abort()
        run.account()


def _sse(obj: dict, with_usage_field: bool) -> bytes:
    if with_usage_field and "usage" not in obj:
        obj["usage"] = None
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _CountRequests:
    """ASGI middleware: count every HTTP request by endpoint and status (errors included)."""
    _ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in self._ENDPOINTS else "other", str(status[0])).inc()
