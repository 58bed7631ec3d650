"""The ERNIE 4.5 tokenizer: a SentencePiece model, the ERNIE chat template, and a trainer for tiny tokenizers.

Spec: docs/formats/tokenizer.md. No paddle here, so data tools can tokenize without loading a framework.
"""
import hashlib
import io
import json
import os
import re
from pathlib import Path

import sentencepiece as spm

from libernie.errors import TokenizerError

# Pieces that stand for themselves when they appear in text (ERNIE's tokenizer_config.json names them
# cls, sep, mask, sys_start, sys_end, header_start, header_end).
SPECIAL_TEXT_TOKENS = ("<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>",
                       "<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>")

# The chat template of the published ERNIE 4.5 tokenizer_config.json, byte for byte. render_chat() is the
# same thing in Python; tests/libernie/test_tokenizer.py checks both against transformers.
CHAT_TEMPLATE = (
    '{%- if not add_generation_prompt is defined -%}\n'
    '    {%- set add_generation_prompt = true -%}\n'
    '{%- endif -%}\n'
    '{%- if not cls_token is defined -%}\n'
    '    {%- set cls_token = "<|begin_of_sentence|>" -%}\n'
    '{%- endif -%}\n'
    '{%- if not sep_token is defined -%}\n'
    '    {%- set sep_token = "<|end_of_sentence|>" -%}\n'
    '{%- endif -%}\n'
    '{{- cls_token -}}\n'
    '{%- for message in messages -%}\n'
    '    {%- if message["role"] == "user" -%}\n'
    '        {{- "User: " + message["content"] + "\n" -}}\n'
    '    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n'
    '    {%- elif message["role"] == "system" -%}\n'
    '        {{- message["content"] + "\n" -}}\n'
    '    {%- endif -%}\n'
    '{%- endfor -%}\n'
    '{%- if add_generation_prompt -%}\n'
    '    {{- "Assistant: " -}}\n'
    '{%- endif -%}'
)

_MODEL_FILE = "tokenizer.model"
_HINT = "pass a directory containing tokenizer.model or the .model file"


def resolve_tokenizer_file(path) -> Path:
    """The one rule every tool's --tokenizer follows: PATH is a directory holding tokenizer.model, or a
    SentencePiece model file of any name (tok.model, spm.model...). Returns that file's path; its directory
    is where tokenizer_config.json and the other side files are looked for.

    Raises TokenizerError (one line naming PATH) if PATH does not exist, or is a directory without
    tokenizer.model. Whether the file really is an ERNIE SentencePiece model is checked when it is loaded.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        model = p / _MODEL_FILE
        if not model.is_file():
            raise TokenizerError(f"{path}: no {_MODEL_FILE} found; {_HINT}")
        return model
    if not p.exists():
        raise TokenizerError(f"{path}: no such file or directory; {_HINT}")
    return p


class ErnieTokenizer:
    """A SentencePiece tokenizer with ERNIE 4.5's ids, special tokens and chat template.

    Build it with `ErnieTokenizer.from_pretrained(path)` or `train_tokenizer(...)`; the constructor takes the
    raw bytes of a tokenizer.model (`source` names them in error messages).
    """

    pad_id = 0  # ERNIE has no pad piece; padding reuses <unk>
    unk_id = 0
    bos_id = 1
    eos_id = 2
    cls_token = "<|begin_of_sentence|>"
    sep_token = "<|end_of_sentence|>"
    model_max_length = 131072  # ERNIE 4.5's max_position_embeddings; kept from tokenizer_config.json on load

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        self._bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._bytes)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{source}: not a SentencePiece model ({_one_line(e)}); {_HINT}") from None
        n = self._sp.get_piece_size()
        fixed = [self._sp.id_to_piece(i) if i < n else None for i in range(3)]
        if fixed != ["<unk>", "<s>", "</s>"]:
            raise TokenizerError(f"{source}: ids 0,1,2 are {fixed}, expected ['<unk>', '<s>', '</s>']; "
                                 "not an ERNIE tokenizer (rebuild it with scripts/build_tokenizer.py)")
        self._special = {t: self._sp.piece_to_id(t) for t in SPECIAL_TEXT_TOKENS}
        for token in (self.cls_token, self.sep_token):
            if self._special[token] == self.unk_id:
                raise TokenizerError(f"{source}: no {token} piece; not an ERNIE tokenizer "
                                     "(rebuild it with scripts/build_tokenizer.py)")
        self._special = {t: i for t, i in self._special.items() if i != self.unk_id}
        self._split_re = re.compile("(" + "|".join(map(re.escape, self._special)) + ")")  # none is a prefix of another
        self._special_ids = {self.unk_id, self.bos_id, self.eos_id, *self._special.values()}
        # SentencePiece exposes add_dummy_prefix only through the proto; a leading "▁" on "x" reveals it.
        self.add_dummy_prefix = self._sp.encode("x", out_type=str)[0].startswith("\u2581")

    @property
    def vocab_size(self) -> int:
        """Number of pieces in tokenizer.model (ids are 0..vocab_size-1)."""
        return self._sp.get_piece_size()

    @property
    def sha256(self) -> str:
        """Hex sha256 of the tokenizer.model bytes; tools record it to catch a tokenizer/data mismatch."""
        return hashlib.sha256(self._bytes).hexdigest()

    @property
    def cls_id(self) -> int:
        return self._special[self.cls_token]

    @property
    def sep_id(self) -> int:
        return self._special[self.sep_token]

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special text tokens present in this vocabulary -> id."""
        return dict(self._special)

    @classmethod
    def from_pretrained(cls, path) -> "ErnieTokenizer":
        """Load from a directory holding tokenizer.model (and maybe tokenizer_config.json) or a .model file
        of any name; `resolve_tokenizer_file` decides which file that is."""
        model = resolve_tokenizer_file(path)
        try:
            data = model.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{model}: cannot read ({e.strerror}); {_HINT}") from None
        tok = cls(data, source=str(model))
        config = model.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                max_len = json.loads(config.read_text(encoding="utf-8")).get("model_max_length")
            except (ValueError, AttributeError) as e:
                raise TokenizerError(f"{config}: not a JSON object ({_one_line(e)}); fix or delete it") from None
            if isinstance(max_len, int) and max_len > 0:
                tok.model_max_length = max_len
        return tok

    def save_pretrained(self, out_dir) -> None:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into out_dir (created).

        Each file is written to a temporary name first and renamed over the old one, so a crash never leaves
        a half-written file behind under the real name.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        named = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                 "cls_token": self.cls_token, "sep_token": self.sep_token}
        for key, token in zip(("mask_token", "sys_start_token", "sys_end_token", "header_start_token",
                               "header_end_token"), SPECIAL_TEXT_TOKENS[2:]):
            if token in self._special:
                named[key] = token
        added = {str(i): {"content": self._sp.id_to_piece(i), "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False, "special": True}
                 for i in sorted(self._special_ids)}
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": True,
            "add_prefix_space": self.add_dummy_prefix,  # transformers' Metaspace must copy SentencePiece
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            **named,
            "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATE,
        }
        files = {
            _MODEL_FILE: self._bytes,
            "tokenizer_config.json": _json_bytes(config),
            "special_tokens_map.json": _json_bytes(named),
        }
        for name, data in files.items():
            tmp = out / f".{name}.tmp-{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without bos/eos. Special text tokens (e.g. <|end_of_sentence|>) become one id."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """encode() for many texts using SentencePiece's thread pool; same result as [encode(t) for t in texts]."""
        if isinstance(texts, str):
            raise TokenizerError("encode_batch takes a list of strings, not one string; use encode()")
        # Cut every text at its special tokens, encode all plain chunks in one batched call, then reassemble.
        parts = [self._split_re.split(t) for t in texts]
        plain = [chunk for p in parts for chunk in p[0::2]]
        encoded = iter(self._sp.encode(plain, num_threads=max(1, int(num_threads))))
        out = []
        for p in parts:
            ids = []
            for k, chunk in enumerate(p):
                ids.extend(next(encoded) if k % 2 == 0 else [self._special[chunk]])
            out.append(ids)
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ids (a list of ints or a 1-D numpy array). Special tokens appear as their text
        ("<s>", "<|end_of_sentence|>", "<unk>" for id 0) unless skip_special_tokens=True."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"decode: id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        # SentencePiece turns control pieces (<s>, </s>) into "" and <unk> into " ⁇ ", so decode the plain
        # runs with it and write the special pieces ourselves, as transformers does.
        text, run = [], []
        for i in ids:
            if i in self._special_ids:
                text.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    text.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        text.append(self._sp.decode(run))
        return "".join(text)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template applied to messages [{"role": "system"|"user"|"assistant", "content": str}].

        Same string as transformers' apply_chat_template(messages, tokenize=False, add_generation_prompt=...)
        with CHAT_TEMPLATE. A system message may appear anywhere; it is rendered in place.
        """
        return "".join(text for text, _ in self._chat_segments(messages, add_generation_prompt))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss_mask): loss_mask is 1 on each assistant content and the <|end_of_sentence|> closing it.

        Prompt text and each assistant content are encoded separately, as ERNIEKit does, so the mask is exact
        and the tokens of a reply match what the model sees at inference, where the prompt is tokenized alone
        and ends in "Assistant: ". ids equal encode(render_chat(messages)) unless SentencePiece would merge
        across a boundary (e.g. the space of "Assistant: " with the first word of the reply). decode(ids) ==
        render_chat(messages) when the model has no add_dummy_prefix (true of every model train_tokenizer makes);
        with it, SentencePiece puts a "▁" before every separately encoded piece, as in ERNIEKit.
        """
        ids, mask = [], []
        for text, trained in self._chat_segments(messages, add_generation_prompt):
            piece = self.encode(text)  # the closing sep is a special token: one id
            ids.extend(piece)
            mask.extend([int(trained)] * len(piece))
        return ids, mask

    def _chat_segments(self, messages, add_generation_prompt) -> list[tuple[str, bool]]:
        """The rendered chat as (text, is_reply) pieces in order; the prompt text between replies is one piece."""
        if not isinstance(messages, (list, tuple)):
            raise TokenizerError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
        segments, prompt = [], self.cls_token
        for k, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            content = m.get("content") if isinstance(m, dict) else None
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise TokenizerError(f"chat message {k}: need {{'role': 'system'|'user'|'assistant', "
                                     f"'content': str}}, got {_one_line(repr(m))[:80]}")
            if role == "system":
                prompt += content + "\n"
            elif role == "user":
                prompt += "User: " + content + "\n"
            else:
                segments += [(prompt + "Assistant: ", False), (content, True), (self.sep_token, True)]
                prompt = ""
        prompt += "Assistant: " if add_generation_prompt else ""
        return segments + [(prompt, False)] if prompt else segments


def train_tokenizer(text_files: list[str], out_dir: str, vocab_size: int = 2048, seed: int = 0) -> ErnieTokenizer:
    """Train a byte-fallback BPE SentencePiece model on text_files (one sentence per line) and save it to out_dir.

    Deterministic: the same files in the same order give a byte-identical tokenizer.model (one thread, no
    sampling or shuffling, and lines are streamed in so no file path or output path lands in the model).
    vocab_size (default 2048) counts the 3 control pieces, 7 special tokens and 256 byte pieces; the corpus must
    support it or TokenizerError says the maximum. seed (default 0) seeds SentencePiece's process-wide generator.
    """
    paths = [Path(f) for f in text_files]
    if not paths:
        raise TokenizerError("train_tokenizer: no text files given; pass at least one .txt file")
    for p in paths:
        if not p.is_file():
            raise TokenizerError(f"{p}: no such text file; pass existing UTF-8 text files, one sentence per line")

    def lines():
        for p in paths:
            with open(p, encoding="utf-8") as f:
                try:
                    for line in f:
                        if line.strip():
                            yield line.rstrip("\n")
                except UnicodeDecodeError as e:
                    raise TokenizerError(f"{p}: not UTF-8 ({_one_line(e)}); convert it to UTF-8") from None

    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)  # BPE training draws nothing random today; pinned in case an option does
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(SPECIAL_TEXT_TOKENS),
            byte_fallback=True, character_coverage=1.0, split_digits=True,
            # Keep text exactly as written: no NFKC, no whitespace collapsing, no dummy leading space. Then
            # decode(encode(s)) == s for any s, and transformers' LlamaTokenizer gives the same ids.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        )
    except (RuntimeError, OSError) as e:
        where = f"{paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
        raise TokenizerError(f"{where}: SentencePiece training failed ({_one_line(e)}); "
                             "use more text or a smaller vocab_size") from None
    tok = ErnieTokenizer(buf.getvalue(), source="trained model")
    tok.save_pretrained(out_dir)
    return tok


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _one_line(e) -> str:
    return " ".join(str(e).split())
