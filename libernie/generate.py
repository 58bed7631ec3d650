"""generate(): batched prefill + incremental decoding with a KV cache, greedy or sampled."""
from __future__ import annotations

import numpy as np
import paddle

from libernie.sampling import SamplingParams, sample


@paddle.no_grad()
def generate(model, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
             stop_token_ids=(), repetition_penalty: float = 1.0) -> list[list[int]]:
    """Continue each prompt. Returns the new token ids per prompt (eos/stop token included if hit).

    prompts: a list of token-id lists (any lengths; left-padded here) or one list.
    temperature 0 is greedy. seed: an int (prompt i draws from np.random.default_rng([seed, i])) or a
    list with one seed per prompt; either way a prompt's output does not depend on its batch mates.
    """
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty)
    params.validate()
    cfg = model.config
    stops = set(stop_token_ids) | {cfg.eos_token_id if eos_token_id is None else eos_token_id}
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = np.full((b, width), cfg.pad_token_id, dtype=np.int64)
    pad = np.zeros((b, width), dtype=np.int64)
    for i, p in enumerate(prompts):                           # left padding: the last column is the newest token
        ids[i, width - len(p):], pad[i, width - len(p):] = p, 1
    seeds = seed if isinstance(seed, (list, tuple)) else [None if seed is None else [seed, i] for i in range(b)]
    rngs = [np.random.default_rng(s) for s in seeds]
    outs: list[list[int]] = [[] for _ in range(b)]
    active = list(range(b))                                   # rows still generating, in cache order
    cache = model.new_cache()
    mask = paddle.to_tensor(pad)
    step_ids = paddle.to_tensor(ids)
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
        logits = logits.astype("float32").numpy()            # [active, V]
        nxt, keep = [], []
        for row, i in enumerate(active):
            seen = (np.concatenate([np.asarray(prompts[i]), np.asarray(outs[i], dtype=np.int64)])
                    if repetition_penalty != 1.0 else None)    # only the penalty needs the history
            tok = sample(logits[row], params, rngs[i], seen=seen)
            outs[i].append(tok)
            if tok not in stops:
                nxt.append(tok)
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):                           # finished sequences leave the batch
            index = paddle.to_tensor(keep, dtype="int64")
            cache.select(index)
            mask = paddle.gather(mask, index)
            active = [active[r] for r in keep]
        step_ids = paddle.to_tensor(np.array(nxt, dtype=np.int64)[:, None])
        mask = paddle.concat([mask, paddle.ones([len(active), 1], dtype=mask.dtype)], axis=1)
    return outs
