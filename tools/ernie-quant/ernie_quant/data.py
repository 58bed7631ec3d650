"""Calibration and evaluation sequences from ernie-pack shards, checked against the model's tokenizer,
plus the two passes over a live model that need them: activation amax (hooks) and perplexity."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import paddle

from libernie.config import ErnieConfig
from libernie.data.dataset import PackedDataset
from libernie.model.loss import causal_lm_loss

from ernie_quant.errors import QuantError


def open_dataset(prefix: str, cfg: ErnieConfig, model_dir: str, tokenizer: str | None, what: str) -> PackedDataset:
    """PackedDataset(prefix), refused when it was packed with a tokenizer other than the model's."""
    ds = PackedDataset(prefix, pad=False)
    if len(ds) == 0:
        raise QuantError(f"{ds.path}: {what} set has no sequences; pack some text with ernie-pack")
    want = _tokenizer_sha(model_dir, tokenizer)
    have = ds.tokenizer_sha256
    if want and have and want != have:
        raise QuantError(f"{ds.path}: packed with another tokenizer (sha256 {have[:12]}..) than the model's "
                         f"({want[:12]}..); repack the {what} text with the model's tokenizer.model")
    vocab = int(ds.manifest.tokenizer.get("vocab_size") or 0)
    if vocab > cfg.vocab_size:
        raise QuantError(f"{ds.path}: packed with a {vocab}-token vocabulary, the model has {cfg.vocab_size}; "
                         f"repack the {what} text with the model's tokenizer")
    return ds


def _tokenizer_sha(model_dir: str, tokenizer: str | None) -> str | None:
    from libernie.tokenizer import ErnieTokenizer
    path = tokenizer or (model_dir if os.path.isfile(os.path.join(model_dir, "tokenizer.model")) else None)
    return ErnieTokenizer.from_pretrained(path).sha256 if path else None


def batches(ds: PackedDataset, n: int, seq_len: int | None = None) -> Iterator[dict[str, paddle.Tensor]]:
    """The first `n` sequences of `ds`, one per batch, cut to `seq_len` tokens: dicts of int64 [1, s] tensors
    input_ids, position_ids, doc_ids (unpadded, so every activation seen is a real token's)."""
    for i in range(min(n, len(ds))):
        s = ds[i]
        k = s.length if seq_len is None else min(s.length, seq_len)
        if k < 2:
            continue
        yield {"input_ids": paddle.to_tensor(s.input_ids[None, :k].astype(np.int64)),
               "position_ids": paddle.to_tensor(s.position_ids[None, :k].astype(np.int64)),
               "doc_ids": paddle.to_tensor(s.doc_ids[None, :k].astype(np.int64))}


def check_ids(batch: dict, vocab: int, where: str) -> None:
    top = int(batch["input_ids"].max())
    if top >= vocab:
        raise QuantError(f"{where}: token id {top} is outside the model's vocabulary ({vocab}); packed with "
                         "another tokenizer? repack with the model's")


@paddle.no_grad()
def activation_amax(model, data, modules: list[str], where: str = "calibration") -> tuple[dict[str, float], int]:
    """Run `model` once over `data` with a forward pre-hook on each named Linear; returns
    ({module name: max |input|}, tokens seen)."""
    layers = dict(model.named_sublayers())
    amax = {m: 0.0 for m in modules}
    hooks = []
    for m in modules:
        def hook(layer, inputs, m=m):
            amax[m] = max(amax[m], float(paddle.abs(inputs[0]).max()))
        hooks.append(layers[m].register_forward_pre_hook(hook))
    tokens = 0
    try:
        for b in data:
            check_ids(b, model.config.vocab_size, where)
            model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
            tokens += int(b["input_ids"].shape[1])
    finally:
        for h in hooks:
            h.remove()
    return amax, tokens


@paddle.no_grad()
def perplexity(model, data, where: str = "eval") -> tuple[float, int]:
    """exp(mean next-token cross entropy) over `data` (documents never predict across a boundary)."""
    total, count = 0.0, 0.0
    for b in data:
        check_ids(b, model.config.vocab_size, where)
        out = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
        s, c = causal_lm_loss(out.logits, b["input_ids"], doc_ids=b["doc_ids"], reduction="none")
        total, count = total + float(s), count + float(c)
    if count == 0:
        raise QuantError(f"{where}: no predictable tokens in the evaluation set")
    return float(np.exp(total / count)), int(count)


class HiddenSpill:
    """The calibration sequences' hidden states [1, s, h] float32 between two decoder layers, kept in an
    anonymous temporary file (unlinked at once: nothing is left behind, whatever happens) and read back one
    sequence at a time, so resident memory holds one sequence's state, not all of them: with the default 128
    sequences of 4,096 tokens that is 2 GiB at hidden 1,024 and 5 GiB at 2,560. Plain reads and writes: the
    bytes sit in the page cache, not in this process's RSS. Same float32 values back, bit for bit."""

    def __init__(self, directory: str | None = None):
        import tempfile
        self.file = tempfile.TemporaryFile(dir=directory)
        self.fd = self.file.fileno()
        self.place: list[tuple[int, tuple]] = []           # (offset, shape) of each sequence
        self.end = 0

    def append(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, np.float32)
        self.place.append((self.end, x.shape))
        self._put(self.end, x)
        self.end += x.nbytes

    def __len__(self) -> int:
        return len(self.place)

    def __getitem__(self, k: int) -> np.ndarray:
        off, shape = self.place[k]
        out = np.empty(shape, np.float32)
        view, got = memoryview(out.reshape(-1).view(np.uint8)), 0
        while got < view.nbytes:
            n = os.preadv(self.fd, [view[got:]], off + got)
            if n <= 0:
                raise OSError(f"calibration spill file: short read at {off + got}")
            got += n
        return out

    def __setitem__(self, k: int, x: np.ndarray) -> None:
        off, shape = self.place[k]
        x = np.ascontiguousarray(x, np.float32)
        if x.shape != shape:
            raise ValueError(f"hidden state {k}: shape {x.shape}, spilled {shape}")   # a caller bug
        self._put(off, x)

    def _put(self, off: int, x: np.ndarray) -> None:
        view, done = memoryview(x.reshape(-1).view(np.uint8)), 0
        while done < view.nbytes:
            done += os.pwrite(self.fd, view[done:], off + done)

    def close(self) -> None:
        self.file.close()


@paddle.no_grad()
def activation_amax_streaming(src, data, modules: list[str], where: str = "calibration",
                              spill_dir: str | None = None) -> tuple[dict[str, float], int]:
    """activation_amax without ever holding the model: the calibration tokens' embedding rows are read from
    the checkpoint, then one decoder layer at a time is loaded, run over every sequence's hidden state and
    freed. Memory: one layer plus one sequence's hidden state [s, h] (the others wait in a HiddenSpill file in
    spill_dir, default the system's temporary directory). Gives the same amax as activation_amax on the whole
    model (tests compare them). src: an ernie_quant.stream.Source."""
    from libernie.checkpoint.names import rules
    from libernie.checkpoint.safetensors_io import to_float32
    from libernie.model import ErnieForCausalLM
    cfg, reader = src.cfg, src.reader
    with paddle.LazyGuard():
        ernie = ErnieForCausalLM(cfg).ernie
    params = dict(ernie.named_parameters(prefix="ernie"))
    table = {r.paddle: r for r in rules(cfg)}

    def load(prefix):
        for name, p in params.items():
            if name.startswith(prefix):
                p.set_value(src.read_paddle_f32(table[name]))

    def free(layer):
        for p in layer.parameters():
            p._clear_data()

    for b in data:
        check_ids(b, cfg.vocab_size, where)
    # The embedding is looked up in the file: only the rows of the calibration tokens are ever read, and their
    # mapped pages are dropped from RSS afterwards (a mapped page counts while the map is open).
    rule = table["ernie.embed_tokens.weight"]
    emb_name = rule.paddle if reader.layout == "paddle" else rule.hf[0]
    emb, dt = reader.get(emb_name)                                                   # memory map [V, h]
    hidden = HiddenSpill(spill_dir)
    try:
        for b in data:
            hidden.append(to_float32(np.asarray(emb[b["input_ids"].numpy()]), dt))     # [1, s, h]
        del emb
        reader.release(emb_name)
        layers = dict(ernie.named_sublayers(prefix="ernie"))
        amax = {m: 0.0 for m in modules}
        for i, layer in enumerate(ernie.layers):
            load(f"ernie.layers.{i}.")
            hooks = []
            for m in modules:
                if m.startswith(f"ernie.layers.{i}."):
                    def hook(lay, inputs, m=m):
                        amax[m] = max(amax[m], float(paddle.abs(inputs[0]).max()))
                    hooks.append(layers[m].register_forward_pre_hook(hook))
            for k, b in enumerate(data):
                bs, s = b["input_ids"].shape
                rope, mask = ernie.rope_and_mask(bs, s, b["position_ids"], b["doc_ids"])
                hidden[k] = layer(paddle.to_tensor(hidden[k]), rope, mask).numpy()
            for h in hooks:
                h.remove()
            free(layer)
    finally:
        hidden.close()
    return amax, sum(int(b["input_ids"].shape[1]) for b in data)
