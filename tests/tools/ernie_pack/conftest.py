from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = ROOT / "assets" / "tokenizer"


@pytest.fixture(scope="session")
def tokenizer_path():
    if not (TOKENIZER / "tokenizer.model").is_file():
        pytest.skip(f"{TOKENIZER}/tokenizer.model missing; run scripts/build_tokenizer.py")
    return str(TOKENIZER)


@pytest.fixture(scope="session")
def tok(tokenizer_path):
    from libernie.tokenizer import ErnieTokenizer

    return ErnieTokenizer.from_pretrained(tokenizer_path)
