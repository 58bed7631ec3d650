"""Writes assets/dpo/arithmetic-pref.jsonl (train) and arithmetic-pref-eval.jsonl: preference pairs in
ERNIEKit's DPO format, `{"src": [question], "tgt": [], "response": [[a], [b]], "sort": [x, y]}`, where
the response with the higher sort is the correct sum and the other a typical wrong one (the operands
written side by side, a carry slip of ten, or the difference). The held-out pairs use the sums that
assets/sft/ holds out of SFT. Deterministic: rerun to regenerate the same bytes."""
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "assets", "dpo")
TEMPLATES = ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?"]


def wrong_answer(rng: random.Random, a: int, b: int) -> str:
    """A typical wrong answer to a + b: the operands written side by side, a carry slip (off by ten),
    or the difference."""
    right = a + b
    kind = rng.choice(["concat", "carry", "difference"])
    if kind == "concat":
        return f"{a}{b}"
    if kind == "carry":
        return str(right + 10 if right < 10 or rng.random() < 0.5 else right - 10)
    return str(abs(a - b)) if a != 0 and b != 0 else str(right + 10)


def main():
    rng = random.Random(0)
    sums = [(a, b) for a in range(20) for b in range(20)]
    rng.shuffle(sums)
    held_out, train = sums[:40], sums[40:]                 # the same split as assets/sft/make_arithmetic.py
    os.makedirs(OUT, exist_ok=True)
    for name, chosen in (("arithmetic-pref.jsonl", train), ("arithmetic-pref-eval.jsonl", held_out)):
        with open(os.path.join(OUT, name), "w") as f:
            for a, b in chosen:
                right = str(a + b)
                wrong = wrong_answer(rng, a, b)
                q = rng.choice(TEMPLATES).format(a=a, b=b)
                order = rng.random() < 0.5                 # the chosen reply is not always listed first
                resp = [[right], [wrong]] if order else [[wrong], [right]]
                sort = [1, 0] if order else [0, 1]
                f.write(json.dumps({"src": [q], "tgt": [], "response": resp, "sort": sort}) + "\n")


if __name__ == "__main__":
    main()
