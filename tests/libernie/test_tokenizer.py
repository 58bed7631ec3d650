"""libernie.tokenizer: ids, round trips, the chat template and its loss mask, training, errors, transformers parity."""
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from libernie.errors import TokenizerError
from libernie.tokenizer import CHAT_TEMPLATE, SPECIAL_TEXT_TOKENS, ErnieTokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "assets" / "tokenizer"
CORPUS = sorted(str(p) for p in (REPO / "assets" / "corpus").glob("*.txt"))

TEXTS = [
    "",
    "The quiet fox watched Ada from the harbor.",
    "What is 12 + 7? 19",
    "  two leading spaces, three trailing   ",
    "tabs\tand\nnew\nlines\r\n",
    "Ünïcödé: héllo, naïve café, 你好世界, Привет, 🙂🚀",
    "numbers 0 1 22 333 4444 3.14159 -42 1,000,000 2025-06-30",
    "<|begin_of_sentence|>User: hi\nAssistant: hello<|end_of_sentence|>",
    "a<mask:1>b<mask:4><mask:5><mask:6><mask:7>c",
    "not special: <mask:2> <|begin_of_sentence <s> </s> <unk>",
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    "system": [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    "multi": [{"role": "system", "content": "Be kind."},
              {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another?"}, {"role": "assistant", "content": " Green, and\nred."},
              {"role": "user", "content": "Thanks"}],
    "empty_reply": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
}


@pytest.fixture(scope="module")
def tok():
    return ErnieTokenizer.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def raw_sp():
    """SentencePiece itself, without our wrapper: the independent reference for ids and pieces."""
    return spm.SentencePieceProcessor(model_file=str(SHIPPED / "tokenizer.model"))


# ---- ids and special tokens -----------------------------------------------------------------------------------
def test_fixed_ids_match_the_model(tok, raw_sp):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 0, 1, 2)
    assert [raw_sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (raw_sp.unk_id(), raw_sp.bos_id(), raw_sp.eos_id(), raw_sp.pad_id()) == (0, 1, 2, -1)
    assert tok.vocab_size == raw_sp.get_piece_size() == 2048
    assert [tok.decode([i]) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def test_special_text_tokens_are_single_ids(tok, raw_sp):
    ids = [raw_sp.piece_to_id(t) for t in SPECIAL_TEXT_TOKENS]
    assert len(set(ids)) == len(ids) and min(ids) > 2  # present, distinct, not unk/bos/eos
    for token, i in zip(SPECIAL_TEXT_TOKENS, ids):
        assert tok.encode(token) == [i]
        assert tok.decode([i]) == token
    assert tok.cls_id == raw_sp.piece_to_id("<|begin_of_sentence|>")
    assert tok.sep_id == raw_sp.piece_to_id("<|end_of_sentence|>")
    assert tok.encode("ab<|end_of_sentence|>cd") == tok.encode("ab") + [tok.sep_id] + tok.encode("cd")


def test_bos_eos_text_is_not_special(tok):
    # "<s>" typed by a user must not end a sequence; only ERNIE's text specials map to one id.
    assert tok.bos_id not in tok.encode("<s>") and tok.eos_id not in tok.encode("</s>")


# ---- encode / decode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_and_digits(tok, raw_sp):
    pieces = [raw_sp.id_to_piece(i) for i in tok.encode("你")]
    assert pieces == ["<0xE4>", "<0xBD>", "<0xA0>"]  # the UTF-8 bytes of 你, no <unk>
    assert [raw_sp.id_to_piece(i) for i in tok.encode("2025")] == ["2", "0", "2", "5"]
    assert tok.unk_id not in tok.encode(TEXTS[5])


def test_encode_matches_plain_sentencepiece_without_specials(tok, raw_sp):
    lines = Path(CORPUS[0]).read_text(encoding="utf-8").splitlines()[:50]
    assert [tok.encode(t) for t in lines] == raw_sp.encode(lines)


def test_decode_accepts_numpy_and_skips_specials(tok):
    ids = tok.encode("<|begin_of_sentence|>Hi there<|end_of_sentence|>")
    assert tok.decode(np.array(ids, dtype=np.int32)) == tok.decode(ids)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id], skip_special_tokens=True) == "Hi there"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_encode_batch_equals_encode(tok, threads):
    texts = TEXTS + Path(CORPUS[-1]).read_text(encoding="utf-8").splitlines()[:200]
    assert tok.encode_batch(texts, num_threads=threads) == [tok.encode(t) for t in texts]


# ---- chat -----------------------------------------------------------------------------------------------------
B, E = "<|begin_of_sentence|>", "<|end_of_sentence|>"
EXPECTED_CHAT = {  # written by hand from the published template
    "single": B + "User: What is 2 + 2?\nAssistant: 4" + E,
    "system": B + "You are terse.\nUser: Hi\nAssistant: Hello." + E,
    "multi": B + "Be kind.\nUser: Name a color.\nAssistant: Blue." + E
             + "User: Another?\nAssistant:  Green, and\nred." + E + "User: Thanks\n",
    "empty_reply": B + "User: \nAssistant: " + E,
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_chat_exact(tok, name):
    assert tok.render_chat(CONVERSATIONS[name]) == EXPECTED_CHAT[name]
    assert tok.render_chat(CONVERSATIONS[name], add_generation_prompt=True) == EXPECTED_CHAT[name] + "Assistant: "


def test_render_chat_rejects_bad_messages(tok):
    with pytest.raises(TokenizerError, match="chat message 1"):
        tok.render_chat([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="chat message 0"):
        tok.render_chat([{"role": "user", "content": None}])


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encode_chat_mask(tok, name):
    messages = CONVERSATIONS[name]
    ids, mask = tok.encode_chat(messages)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert tok.decode(ids) == tok.render_chat(messages)
    replies = "".join(m["content"] + E for m in messages if m["role"] == "assistant")
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == replies
    prompt = EXPECTED_CHAT[name]
    for m in messages:
        if m["role"] == "assistant":
            prompt = prompt.replace(m["content"] + E, "", 1)
    assert tok.decode([i for i, k in zip(ids, mask) if not k]) == prompt
    assert mask.count(1) == sum(len(tok.encode(m["content"])) + 1 for m in messages if m["role"] == "assistant")


def test_encode_chat_prompt_tokens_match_inference(tok):
    # The tokens before the first reply are exactly what a server feeds the model for that prompt.
    messages = CONVERSATIONS["multi"]
    ids, mask = tok.encode_chat(messages)
    prompt_ids = tok.encode(tok.render_chat(messages[:2], add_generation_prompt=True))
    assert ids[: len(prompt_ids)] == prompt_ids and mask[: len(prompt_ids)] == [0] * len(prompt_ids)
    assert mask[len(prompt_ids)] == 1
    ids_gen, mask_gen = tok.encode_chat(messages, add_generation_prompt=True)
    assert ids_gen[-len(tok.encode("Assistant: ")):] == tok.encode("Assistant: ") and mask_gen[-1] == 0


def test_encode_chat_equals_encode_when_no_merge_across_segments(tok):
    # Replies that start with a digit cannot merge with the "▁" of "Assistant: " (digits are split).
    messages = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"},
                {"role": "user", "content": "And 10 + 5?"}, {"role": "assistant", "content": "15"}]
    ids, _ = tok.encode_chat(messages)
    assert ids == tok.encode(tok.render_chat(messages))


def test_chat_template_in_docs_matches_code():
    doc = (REPO / "docs" / "formats" / "tokenizer.md").read_text(encoding="utf-8")
    block = re.search(r"```jinja\n(.*?)\n```", doc, re.S)
    assert block and block.group(1) == CHAT_TEMPLATE


# ---- save / load / train --------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]  # no temp files left
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["tokenizer_class"], config["add_bos_token"], config["add_eos_token"], config["legacy"]) == (
        "LlamaTokenizer", False, False, True)
    assert config["added_tokens_decoder"][str(tok.sep_id)]["content"] == E
    config["model_max_length"] = 4096
    (tmp_path / "out" / "tokenizer_config.json").write_text(json.dumps(config))
    again = ErnieTokenizer.from_pretrained(tmp_path / "out" / "tokenizer.model")
    assert again.sha256 == tok.sha256 and again.model_max_length == 4096
    assert again.encode(TEXTS[5]) == tok.encode(TEXTS[5])


def test_train_is_deterministic_and_matches_shipped_asset(tmp_path):
    a = train_tokenizer(CORPUS, tmp_path / "a", vocab_size=2048)
    b = train_tokenizer(CORPUS, tmp_path / "b", vocab_size=2048)
    model_a = (tmp_path / "a" / "tokenizer.model").read_bytes()
    assert model_a == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a.sha256 == b.sha256
    # A failure here means assets/corpus or sentencepiece changed: rerun scripts/build_tokenizer.py.
    assert model_a == (SHIPPED / "tokenizer.model").read_bytes()
    small = train_tokenizer(CORPUS, tmp_path / "small", vocab_size=512)
    assert small.vocab_size == 512 and small.sha256 != a.sha256


def test_train_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such text file"):
        train_tokenizer([str(tmp_path / "missing.txt")], tmp_path / "t")
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    with pytest.raises(TokenizerError, match="tiny.txt: SentencePiece training failed"):
        train_tokenizer([str(tmp_path / "tiny.txt")], tmp_path / "t", vocab_size=5000)


def _one_line_error(path) -> str:
    with pytest.raises(TokenizerError) as info:
        ErnieTokenizer.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_bad_paths(tmp_path):
    assert "no such file" in _one_line_error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no tokenizer.model found" in _one_line_error(tmp_path / "empty")
    (tmp_path / "junk.model").write_bytes(os.urandom(64) + b"\xff" * 64)
    assert "not a SentencePiece model" in _one_line_error(tmp_path / "junk.model")


def test_model_without_ernie_pieces_is_rejected(tmp_path):
    text = CORPUS[-1]
    spm.SentencePieceTrainer.train(input=text, model_prefix=str(tmp_path / "nobos"), vocab_size=300,
                                   bos_id=-1, eos_id=-1, minloglevel=2, num_threads=1)
    assert "ids 0,1,2" in _one_line_error(tmp_path / "nobos.model")
    spm.SentencePieceTrainer.train(input=text, model_prefix=str(tmp_path / "nocls"), vocab_size=300,
                                   minloglevel=2, num_threads=1)  # spm's defaults: <unk>, <s>, </s> at 0, 1, 2
    assert "no <|begin_of_sentence|> piece" in _one_line_error(tmp_path / "nocls.model")


# ---- transformers parity --------------------------------------------------------------------------------------
ORACLE_SCRIPT = r"""
import json, sys
from transformers import AutoTokenizer
job = json.load(sys.stdin)
t = AutoTokenizer.from_pretrained(job["dir"])
out = {"class": type(t).__name__,
       "chats": [t.apply_chat_template(m, tokenize=False, add_generation_prompt=g) for m, g in job["chats"]],
       "ids": [t.encode(s, add_special_tokens=False) for s in job["texts"]]}
out["decoded"] = [t.decode(i) for i in out["ids"]]
print(json.dumps(out))
"""


@pytest.mark.oracle
def test_transformers_agrees(tok, tmp_path, oracle_python):
    python = oracle_python  # tests/conftest.py skips, with the reason, when .venv-oracle is absent or broken
    probe = subprocess.run([python, "-c", "import google.protobuf"], capture_output=True)
    if probe.returncode != 0:  # transformers needs protobuf to read a tokenizer.model without tokenizer.json
        pytest.skip("oracle: protobuf is not installed in .venv-oracle; add it to requirements/oracle.txt")
    tok.save_pretrained(tmp_path / "tok")
    chats = [(m, g) for m in CONVERSATIONS.values() for g in (False, True)]
    texts = TEXTS + [tok.render_chat(m, g) for m, g in chats]
    texts += Path(CORPUS[1]).read_text(encoding="utf-8").splitlines()[:100]
    texts = [t for t in texts if "<s>" not in t]  # transformers maps typed "<s>" to bos; we deliberately do not
    job = json.dumps({"dir": str(tmp_path / "tok"), "chats": chats, "texts": texts})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([python, "-c", ORACLE_SCRIPT], input=job, capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["class"] == "LlamaTokenizer"
    assert out["chats"] == [tok.render_chat(m, g) for m, g in chats]
    assert out["ids"] == [tok.encode(t) for t in texts]
    assert out["decoded"] == [tok.decode(tok.encode(t)) for t in texts]
