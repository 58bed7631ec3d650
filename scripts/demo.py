"""`make demo`: the toolkit end to end on assets the repo ships. Grows with each tool.

Now: build a tiny random ERNIE 4.5 with the shipped tokenizer, save it in the HF layout, convert it
to the Paddle layout tensor by tensor, load both, check they agree, and generate from a chat prompt.
Writes under demo-out/ (or $DEMO_OUT).
"""
import json
import os
import sys
import time

import libernie  # noqa: F401  (CPU thread defaults before paddle)
import numpy as np
import paddle

from libernie.checkpoint import convert_checkpoint
from libernie.config import ernie_tiny
from libernie.model import ErnieForCausalLM
from libernie.tokenizer import ErnieTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step(msg):
    print(f"\n== {msg}", flush=True)


def main():
    out = os.environ.get("DEMO_OUT", os.path.join(ROOT, "demo-out"))
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    step("tokenizer (assets/tokenizer, trained by scripts/build_tokenizer.py from assets/corpus)")
    tok = ErnieTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tokenizer"))
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    prompt = tok.render_chat(messages, add_generation_prompt=True)
    print(f"vocab {tok.vocab_size}, chat prompt {prompt!r} -> {len(tok.encode(prompt))} tokens")

    step("a tiny random ERNIE 4.5, saved in the HF layout (what transformers and vLLM load)")
    paddle.seed(0)
    model = ErnieForCausalLM(ernie_tiny(vocab_size=tok.vocab_size))
    hf_dir = os.path.join(out, "tiny-hf")
    model.save_pretrained(hf_dir, layout="hf", max_shard_size="200KB")
    tok.save_pretrained(hf_dir)
    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    print(f"{hf_dir}: {len(index['weight_map'])} tensors in {len(set(index['weight_map'].values()))} shards, "
          f"{index['metadata']['total_size']} bytes")

    step("convert to the Paddle layout (what FastDeploy loads), one tensor at a time")
    pd_dir = os.path.join(out, "tiny-paddle")
    summary = convert_checkpoint(hf_dir, pd_dir, layout="paddle", overwrite=True)
    print(json.dumps(summary))

    step("load both layouts and compare logits")
    ids = paddle.to_tensor([tok.encode(prompt)])
    a, b = ErnieForCausalLM.from_pretrained(hf_dir), ErnieForCausalLM.from_pretrained(pd_dir)
    with paddle.no_grad():
        diff = float(np.abs(a(ids).logits.numpy() - b(ids).logits.numpy()).max())
    print(f"max |logits(hf) - logits(paddle)| = {diff}")
    if diff != 0.0:
        sys.exit("demo: the two layouts disagree")

    step("generate (KV cache): greedy, then sampled with a seed (random weights: expect gibberish)")
    for kw in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 42}):
        new = b.generate(tok.encode(prompt), max_new_tokens=16, stop_token_ids=[tok.sep_id], **kw)[0]
        print(f"{kw or 'greedy'}: {tok.decode(new)!r}")
    print(f"\ndemo done in {time.time() - t0:.1f}s; outputs in {out}")


if __name__ == "__main__":
    main()
