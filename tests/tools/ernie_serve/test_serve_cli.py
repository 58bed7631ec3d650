"""ernie-serve and ernie-chat as commands: exit codes, one-line errors, SIGTERM drain, the chat REPL."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from ernie_serve.cli import chat_cmd as chat, serve_cmd as main
from serve_testlib import API_KEY, BIN, Server

README = Path(__file__).resolve().parents[3] / "tools" / "ernie-serve" / "README.md"


@pytest.mark.parametrize("command, name", [(main, "ernie-serve"), (chat, "ernie-chat")])
def test_help_starts_with_an_example_and_readme_documents_it(command, name):
    r = CliRunner().invoke(command, ["--help"])
    assert r.exit_code == 0
    assert f"    {name} " in r.output.split("Options:")[0]
    assert f"`{name}" in README.read_text()


def test_a_dir_that_is_not_a_checkpoint_is_exit_1(tmp_path):
    r = CliRunner().invoke(main, [str(tmp_path / "missing")])
    assert r.exit_code == 1
    assert r.stderr.startswith(f"Error: {tmp_path / 'missing'}") and r.stderr.count("\n") == 1
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    r = CliRunner().invoke(main, [str(tmp_path / "half")])
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {tmp_path / 'half'}")


def test_missing_tokenizer_is_exit_1(tmp_path, ckpt):
    import shutil
    d = tmp_path / "notok"
    shutil.copytree(ckpt, d)
    (d / "tokenizer.model").unlink()
    r = CliRunner().invoke(main, [str(d)])
    assert r.exit_code == 1 and "tokenizer.model" in r.stderr and r.stderr.startswith(f"Error: {d}")


def test_weights_that_fail_to_load_are_exit_1(tmp_path, ckpt):
    import shutil
    d = tmp_path / "corrupt"
    shutil.copytree(ckpt, d)
    shard = next(d.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])                    # truncated: the header is fine, the data is not
    r = CliRunner().invoke(main, [str(d), "--port", "0"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and str(d) in r.stderr
    assert r.stdout == ""


def test_usage_errors_are_exit_2(ckpt):
    assert CliRunner().invoke(main, [str(ckpt), "--port", "http"]).exit_code == 2
    assert CliRunner().invoke(main, [str(ckpt), "--max-batch", "0"]).exit_code == 2
    r = CliRunner().invoke(main, [str(ckpt), "--max-model-len", "999999"])
    assert r.exit_code == 2 and "max_position_embeddings" in r.stderr


def test_busy_port_is_exit_1(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = CliRunner().invoke(main, [str(ckpt), "--port", str(port)])
    assert r.exit_code == 1 and f"127.0.0.1:{port}" in r.stderr and r.stderr.count("\n") == 1


def test_sigterm_drains_running_requests_then_exits_0(ckpt, tmp_path):
    s = Server(ckpt, "--max-batch", "2", log_dir=tmp_path)
    body = {"prompt": "drain", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    results = {}

    def ask():
        results["r"] = httpx.post(s.url + "/v1/completions", json=body, timeout=60)

    t = threading.Thread(target=ask)
    t.start()
    for _ in range(200):  # wait until it is in the batch
        if "ernie_serve_num_requests_running 1.0" in httpx.get(s.url + "/metrics").text:
            break
    s.proc.send_signal(signal.SIGTERM)
    t.join(60)
    code = s.proc.wait(60)
    r = results["r"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
    assert code == 0
    summary = json.loads(s.stdout_path.read_text())
    assert summary["generation_tokens"] == 300 and summary["model"] == "tiny-hf"
    with pytest.raises(httpx.TransportError):
        httpx.get(s.url + "/health", timeout=2)


def test_ernie_chat_streams_replies_and_keeps_history(server, client):
    cmd = [str(BIN / "ernie-chat"), "--url", server.url, "--api-key", API_KEY, "--temperature", "0",
           "--max-tokens", "12"]
    p = subprocess.run(cmd, input="Hello there\nAnd then?\n/reset\nAnd then?\n", capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")

    def answer(messages):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                              temperature=0).choices[0].message.content

    first = answer([{"role": "user", "content": "Hello there"}])
    second = answer([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "And then?"}])
    fresh = answer([{"role": "user", "content": "And then?"}])
    assert lines[:3] == [first, second, fresh]


def test_ernie_chat_without_a_server_is_exit_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(chat, ["--url", f"http://127.0.0.1:{port}"], input="hi\n")
    assert r.exit_code == 1 and r.stderr.startswith("Error: http://127.0.0.1:")
