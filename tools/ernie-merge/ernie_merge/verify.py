"""--verify: logits of the merged model against the base with the adapter applied, on a few random sequences.

The reference never reads the merged files. For an ernie-tools adapter it is libernie's own adapted model
(`from_pretrained(base, adapter=dir)`: LoRA layers computing x W + s (x A) B, unmerged). For PaddleFormers and
PEFT adapters the normalized deltas are added to the base's fp32 parameters in memory. Both models are built
whole, so --verify needs RAM for two fp32 copies of the model: use it on small models or on a big machine.
"""
from __future__ import annotations

import os

import numpy as np

from ernie_merge.adapters import TIED_HEAD, Adapter


def verify_merge(base: str, adapter: Adapter | None, out: str, sequences: int = 3, seq_len: int = 16,
                 seed: int = 0) -> dict:
    """{"max_abs_diff", "sequences", "seq_len", "reference"} comparing fp32 logits of `out` with base + adapter."""
    import paddle

    from libernie.model import ErnieForCausalLM

    merged = ErnieForCausalLM.from_pretrained(out)
    ids = np.random.default_rng(seed).integers(0, merged.config.vocab_size, (sequences, seq_len))
    with paddle.no_grad():
        got = merged(paddle.to_tensor(ids)).logits.numpy()
    del merged
    if adapter is None:
        ref_model, how = ErnieForCausalLM.from_pretrained(base), "base"
    elif adapter.kind == "ernie-tools":
        ref_model, how = ErnieForCausalLM.from_pretrained(base, adapter=adapter.path), "libernie LoRA layers"
    else:
        ref_model, how = _with_deltas(base, adapter), "base + deltas in memory"
    with paddle.no_grad():
        want = ref_model(paddle.to_tensor(ids)).logits.numpy()
    return {"max_abs_diff": float(np.abs(got - want).max()), "sequences": sequences, "seq_len": seq_len,
            "reference": how}


def _with_deltas(base: str, adapter: Adapter):
    import dataclasses

    from libernie.model import ErnieForCausalLM

    model = ErnieForCausalLM.from_pretrained(os.fspath(base))
    touched = adapter.targets()
    if model.config.tie_word_embeddings and touched & {TIED_HEAD, "ernie.embed_tokens.weight"}:
        params = {n: p.numpy() for n, p in model.named_parameters()}
        model = ErnieForCausalLM(dataclasses.replace(model.config, tie_word_embeddings=False))
        for n, p in model.named_parameters():
            p.set_value(params["ernie.embed_tokens.weight"].T if n == TIED_HEAD else params[n])
        model.eval()
    params = dict(model.named_parameters())
    for name in sorted(touched):
        w = params[name].numpy().astype(np.float32)
        for r in adapter.replacements:
            if r.target == name:
                w[..., r.offset:r.offset + r.value.shape[-1]] = r.value
        for d in adapter.deltas:
            if d.target == name:
                w[:, d.offset:d.offset + d.b.shape[1]] += d.scaling * (d.a @ d.b)
        params[name].set_value(w)
    return model
