"""The demo's last step: loss curves (text, and a PNG when matplotlib is installed), held-out arithmetic
accuracy of base vs base+LoRA, and one sample chat."""
import argparse
import json
import os

import libernie  # noqa: F401
from libernie.model import ErnieForCausalLM
from libernie.tokenizer import ErnieTokenizer

BARS = " ▁▂▃▄▅▆▇█"


def curve(path: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(path, "metrics.jsonl")))]


def sparkline(points, width=60) -> str:
    ys = [y for _, y in points]
    ys = [ys[int(i * len(ys) / width)] for i in range(min(width, len(ys)))]
    lo, hi = min(ys), max(ys)
    return "".join(BARS[int((y - lo) / (hi - lo + 1e-9) * (len(BARS) - 1))] for y in ys)


def answer(model, tok, question: str, max_new_tokens=6) -> str:
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": question}], add_generation_prompt=True))
    out = model.generate(prompt, max_new_tokens=max_new_tokens, stop_token_ids=[tok.sep_id])[0]
    return tok.decode([t for t in out if t not in (tok.sep_id, tok.eos_id)]).strip()


def accuracy(model, tok, rows) -> float:
    return sum(answer(model, tok, r["src"][0]) == r["tgt"][0] for r in rows) / len(rows)


def main():
    ap = argparse.ArgumentParser()
    for a in ("--pretrain", "--sft", "--base", "--adapter", "--eval", "--png"):
        ap.add_argument(a, required=a != "--png")
    args = ap.parse_args()
    for name, path in (("pretrain", args.pretrain), ("sft (LoRA)", args.sft)):
        pts = curve(path)
        print(f"{name:>10} loss {pts[0][1]:.3f} -> {pts[-1][1]:.3f} over {pts[-1][0]} steps  {sparkline(pts)}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        for a, (name, path) in zip(ax, (("pretrain", args.pretrain), ("LoRA SFT", args.sft))):
            pts = curve(path)
            a.plot([p[0] for p in pts], [p[1] for p in pts])
            a.set_title(name), a.set_xlabel("step"), a.set_ylabel("loss")
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"loss curves drawn to {args.png}")
    except ImportError:
        print("(pip install matplotlib to also get the loss curves as a PNG)")
    tok = ErnieTokenizer.from_pretrained(args.base)
    rows = [json.loads(line) for line in open(args.eval)]
    base = ErnieForCausalLM.from_pretrained(args.base)
    tuned = ErnieForCausalLM.from_pretrained(args.base, adapter=args.adapter)
    print(f"held-out arithmetic ({len(rows)} sums never seen in training), exact answers:")
    print(f"  base model        {accuracy(base, tok, rows):.0%}")
    print(f"  base + LoRA       {accuracy(tuned, tok, rows):.0%}")
    for r in rows[:3]:
        print(f"  User: {r['src'][0]!r:24} Assistant: {answer(tuned, tok, r['src'][0])!r:8} (expected {r['tgt'][0]!r})")


if __name__ == "__main__":
    main()
