"""Issue 12 cases for ernie-train: --tokenizer takes any .model file; an unwritable -o fails before the data
is read. Each checks the one-line error, the exit status, and that nothing was written."""
import shutil

import pytest
from click.testing import CliRunner

from ernie_train.cli import cli
from libernie.tokenizer import ErnieTokenizer
from train_helpers import TOKENIZER, base_args


def test_a_model_file_of_any_name_is_accepted_and_checkpointed_as_tokenizer_model(data, tmp_path):
    shutil.copy(f"{TOKENIZER}/tokenizer.model", tmp_path / "tok.model")   # a bare file: no tokenizer_config.json
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, out, **{"--tokenizer": str(tmp_path / "tok.model"),
                                                                       "--max-steps": "1", "--save-steps": "1"}), "-q"])
    assert r.exit_code == 0, r.stderr
    ckpt = out / "checkpoint-00000001"
    assert (ckpt / "tokenizer.model").read_bytes() == (tmp_path / "tok.model").read_bytes()
    assert (ckpt / "tokenizer_config.json").is_file()  # written for it, so transformers can load the checkpoint
    assert ErnieTokenizer.from_pretrained(ckpt).sha256 == ErnieTokenizer.from_pretrained(TOKENIZER).sha256


@pytest.mark.parametrize("tok, msg", [("{tmp}/nowhere.model", "no such file or directory"),
                                      ("{tmp}", "no tokenizer.model found")])
def test_a_missing_tokenizer_is_one_line(data, tmp_path, tok, msg):
    tok = tok.format(tmp=tmp_path)
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, tmp_path / "run", **{"--tokenizer": tok}), "-q"])
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {tok}: {msg}") and r.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["-o", "--visualdl-logdir"])
def test_unwritable_output_fails_before_the_data_is_read(tmp_path, flag):
    (tmp_path / "file").write_text("x")
    bad = str(tmp_path / "file" / "run")
    over = {"-o": bad} if flag == "-o" else {"-o": str(tmp_path / "run"), "--visualdl-logdir": bad}
    # --data names nothing: were it read first, that would be the error
    r = CliRunner().invoke(cli, ["pretrain", *base_args({"pt": str(tmp_path / "no-such-data")}, "x", **over), "-q"])
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {bad}: cannot be created") and r.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_empty_dataset_is_one_line_and_nothing_written(tmp_path):
    from ernie_pack.api import PackOptions, pack
    (tmp_path / "empty.jsonl").write_text("\n")
    pack(PackOptions("pretrain", TOKENIZER, 64, str(tmp_path / "e"), [str(tmp_path / "empty.jsonl")],
                     allow_empty=True))
    r = CliRunner().invoke(cli, ["pretrain", *base_args({"pt": str(tmp_path / "e")}, tmp_path / "run"), "-q"])
    assert r.exit_code == 1 and r.stderr == f"Error: {tmp_path / 'e.json'}: holds no sequences\n"
    assert not (tmp_path / "run").exists()
