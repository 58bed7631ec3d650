"""The one --tokenizer rule: a directory holding tokenizer.model, or a SentencePiece file of any name."""
import shutil
from pathlib import Path

import pytest

from libernie.errors import TokenizerError
from libernie.tokenizer import ErnieTokenizer, resolve_tokenizer_file

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tokenizer"


def test_directory_and_any_model_file_resolve_to_the_same_tokenizer(tmp_path):
    shutil.copy(ASSET / "tokenizer.model", tmp_path / "spm-ernie.model")
    assert resolve_tokenizer_file(ASSET) == ASSET / "tokenizer.model"
    assert resolve_tokenizer_file(tmp_path / "spm-ernie.model") == tmp_path / "spm-ernie.model"
    assert resolve_tokenizer_file(str(ASSET / "tokenizer.model")) == ASSET / "tokenizer.model"
    a = ErnieTokenizer.from_pretrained(ASSET)
    b = ErnieTokenizer.from_pretrained(tmp_path / "spm-ernie.model")
    assert a.sha256 == b.sha256 and a.encode("the river") == b.encode("the river")


def test_missing_paths_are_one_line(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer.model found; pass a directory") as e:
        resolve_tokenizer_file(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: ")
    with pytest.raises(TokenizerError, match="no such file or directory"):
        resolve_tokenizer_file(tmp_path / "x.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        ErnieTokenizer.from_pretrained(tmp_path / "junk.model")
