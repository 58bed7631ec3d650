"""ernie-serve follows the one --tokenizer rule: a directory or a .model file of any name."""
import shutil

import pytest
from click.testing import CliRunner

from ernie_serve.cli import serve_cmd as main
from serve_testlib import Server


def _without_tokenizer(ckpt, d):
    shutil.copytree(ckpt, d)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    return d


def test_a_model_file_of_any_name_serves(tmp_path, ckpt, tok):
    d = _without_tokenizer(ckpt, tmp_path / "bare")
    shutil.copy(ckpt / "tokenizer.model", tmp_path / "spm.model")
    server = Server(d, "--tokenizer", str(tmp_path / "spm.model"), "--served-model-name", "tiny", log_dir=tmp_path)
    try:
        r = server.post("/v1/completions", {"model": "tiny", "prompt": "The river runs", "max_tokens": 3,
                                            "temperature": 0})
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("The river runs"))
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("name, msg", [("missing.model", "no such file or directory"), ("", "no tokenizer.model")])
def test_a_bad_tokenizer_path_is_one_line_exit_1(tmp_path, ckpt, name, msg):
    d = _without_tokenizer(ckpt, tmp_path / "bare")
    tok = str(tmp_path / name) if name else str(tmp_path)
    r = CliRunner().invoke(main, [str(d), "--tokenizer", tok])
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {tok}: {msg}") and r.stderr.count("\n") == 1
    assert r.stdout == ""


def test_a_model_with_nan_weights_answers_500_not_garbage(tmp_path, ckpt):
    """The issue-12 class of defect on the serving side: NaN weights must not pass for a model."""
    import paddle

    from libernie.model import ErnieForCausalLM
    model = ErnieForCausalLM.from_pretrained(ckpt)
    with paddle.no_grad():
        for _, p in model.named_parameters():
            p.set_value(paddle.full(p.shape, float("nan"), p.dtype))
    d = tmp_path / "nan"
    model.save_pretrained(d)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ckpt / f, d / f)
    server = Server(d, "--served-model-name", "tiny", log_dir=tmp_path)
    try:
        r = server.post("/v1/completions", {"model": "tiny", "prompt": "The river", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 500 and "NaN" in r.json()["error"]["message"]
        assert server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 500
    finally:
        assert server.stop() == 0
