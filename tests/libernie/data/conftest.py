from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[3] / "assets" / "tokenizer"


@pytest.fixture(scope="session")
def tok():
    """The shipped tiny ERNIE tokenizer (assets/tokenizer, built by scripts/build_tokenizer.py)."""
    from libernie.tokenizer import ErnieTokenizer

    if not (ASSETS / "tokenizer.model").is_file():
        pytest.skip(f"{ASSETS}/tokenizer.model missing; run scripts/build_tokenizer.py")
    return ErnieTokenizer.from_pretrained(ASSETS)
