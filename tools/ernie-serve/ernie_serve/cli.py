"""ernie-serve and ernie-chat: thin click commands over ernie_serve.api and ernie_serve.chat."""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import time

import click

import libernie  # noqa: F401  sets MKL/OpenMP defaults before anything imports paddle
from ernie_cli import emit_json, quiet_option, run_main, tokenizer_option
from libernie.errors import ErnieError

SERVE_HELP = """Serve an ERNIE checkpoint over the OpenAI API.

\b
    ernie-serve out/sft-merged --port 8188 &
    curl -s localhost:8188/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

DIR is any checkpoint the ernie tools write (HF or Paddle layout, fp32 or bf16, merged) with its
tokenizer. Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health (503 while
loading), /metrics (Prometheus). SIGTERM finishes the running requests, then exits.
"""


@click.command(help=SERVE_HELP)
@click.argument("model_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", default=8188, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Sequences decoded together.")
@click.option("--max-waiting", default=64, show_default=True, type=click.IntRange(0, 100000),
              help="Sequences that may wait for a slot; past that, requests get 429.")
@click.option("--max-model-len", type=click.IntRange(2), default=None,
              help="Prompt + output tokens per sequence [default: the model's max_position_embeddings].")
@click.option("--api-key", envvar="ERNIE_SERVE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (or set ERNIE_SERVE_API_KEY).")
@click.option("--served-model-name", default=None, help="Model name in the API [default: DIR's basename].")
@tokenizer_option(required=False, help="Tokenizer directory or .model file [default: DIR].")
@quiet_option()
def serve_cmd(model_dir, host, port, max_batch, max_waiting, max_model_len, api_key, served_model_name, tokenizer,
         quiet):
    import uvicorn

    from libernie.checkpoint import CheckpointReader
    from libernie.config import ErnieConfig
    from libernie.tokenizer import ErnieTokenizer

    from ernie_serve.api import ServeConfig, create_app

    log = _logger(quiet)
    try:  # fail before listening: config, shard headers and tokenizer are cheap to check
        model_config = ErnieConfig.from_file(model_dir)
        CheckpointReader(model_dir)
    except ErnieError as e:
        raise click.ClickException(_with_dir(model_dir, e)) from None
    try:  # an explicit --tokenizer's error names that path, not DIR
        tok = ErnieTokenizer.from_pretrained(tokenizer or model_dir)
    except ErnieError as e:
        raise click.ClickException(str(e) if tokenizer else _with_dir(model_dir, e)) from None
    if max_model_len is not None and max_model_len > model_config.max_position_embeddings:
        raise click.BadParameter(f"{max_model_len} exceeds the model's max_position_embeddings "
                                 f"({model_config.max_position_embeddings})", param_hint="--max-model-len")
    cfg = ServeConfig(model_dir, served_model_name, tokenizer, max_batch, max_waiting, max_model_len, api_key)
    sock = _bind(host, port)
    if not api_key and not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
    failure: list[str] = []
    server = None

    def on_load_error(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(cfg, tokenizer=tok, model_config=model_config, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if not quiet else "error",
                                           access_log=False, lifespan="on"))
    bound = sock.getsockname()
    url = f"http://{_url_host(bound[0])}:{bound[1]}"
    log.info("serving %s from %s on %s (max batch %d); loading the model...", cfg.name, model_dir, url, max_batch)
    started = time.monotonic()
    # uvicorn drains open requests on SIGTERM/SIGINT, then re-raises the signal to the handler that was
    # there before it; this one makes that a clean exit (status 0 and the summary below).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise click.ClickException(failure[0])
    m = app.state.serve.metrics
    summary = {"model": cfg.name, "dir": model_dir, "url": url, "uptime_s": round(time.monotonic() - started, 3),
               "requests": int(_total(m.requests)), "prompt_tokens": int(_total(m.prompt_tokens)),
               "generation_tokens": int(_total(m.generation_tokens))}
    emit_json(summary)


def main() -> None:
    run_main(serve_cmd, "ernie-serve")


def _logger(quiet: bool) -> logging.Logger:
    """Plain `ernie-serve: message` lines on stderr (paddle configures the root logger its own way)."""
    log = logging.getLogger("ernie_serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ernie-serve: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    return log


def _with_dir(model_dir: str, e: Exception) -> str:
    msg = str(e)
    return msg if msg.startswith(model_dir.rstrip("/")) else f"{model_dir}: {msg}"


def _bind(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, to report a busy port in one line and to support --port 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise click.ClickException(f"{host}:{port}: cannot listen ({e.strerror}); pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _total(metric) -> float:
    return sum(s.value for fam in metric.collect() for s in fam.samples if s.name.endswith("_total"))


CHAT_HELP = """Chat in the terminal with a running ernie-serve.

\b
    ernie-serve out/sft-merged &
    ernie-chat --url http://127.0.0.1:8188

Each line you type is one user turn; the reply streams to stdout. /reset clears the history,
/exit (or end of input) quits. Works with stdin from a pipe too: one reply per line.
"""


@click.command(help=CHAT_HELP)
@click.option("--url", default="http://127.0.0.1:8188", show_default=True, help="The server's root URL.")
@click.option("--api-key", envvar="ERNIE_SERVE_API_KEY", default=None, help="Bearer key, if the server wants one.")
@click.option("--model", default=None, help="Model name [default: the server's only model].")
@click.option("--system", default=None, help="System prompt.")
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0.0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=None, type=int, help="Sampling seed, for reproducible replies.")
def chat_cmd(url, api_key, model, system, temperature, top_p, max_tokens, seed):
    from ernie_serve.chat import ChatError, ChatSession

    try:
        session = ChatSession(url, api_key=api_key, model=model, system=system, temperature=temperature,
                              top_p=top_p, max_tokens=max_tokens, seed=seed)
    except ChatError as e:
        raise click.ClickException(f"{url}: {e}") from None
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"chatting with {session.model} at {url}; /reset clears history, /exit quits", err=True)
    failed = False
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            continue
        if not line:
            continue
        try:
            for piece in session.ask(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
        except ChatError as e:
            click.echo(f"Error: {e}", err=True)
            failed = True
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            break
    if failed and not interactive:
        sys.exit(1)


def chat() -> None:
    run_main(chat_cmd, "ernie-chat")
