"""Writes assets/dpo/arithmetic-pref.jsonl (train) and arithmetic-pref-eval.jsonl: preference pairs in
ERNIEKit's DPO format, `{"src": [question], "tgt": [], "response": [[a], [b]], "sort": [x, y]}`, where
the response with the higher sort is the correct sum and the other a plausible wrong one (off by 1-3,
or its digits swapped). The held-out pairs use the sums assets/sft/ holds out of SFT. Deterministic:
rerun to regenerate the same bytes."""
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "assets", "dpo")
TEMPLATES = ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?"]


def wrong_answer(rng: random.Random, right: int) -> int:
    if right >= 10 and right % 11 and rng.random() < 0.25:
        return int(str(right)[::-1])                       # digits swapped: 31 -> 13
    if right == 0:
        return rng.randint(1, 3)
    return max(0, right + rng.choice([-3, -2, -1, 1, 2, 3]))


def main():
    rng = random.Random(0)
    sums = [(a, b) for a in range(20) for b in range(20)]
    rng.shuffle(sums)
    held_out, train = sums[:40], sums[40:]                 # the same split as assets/sft/make_arithmetic.py
    os.makedirs(OUT, exist_ok=True)
    for name, chosen in (("arithmetic-pref.jsonl", train), ("arithmetic-pref-eval.jsonl", held_out)):
        with open(os.path.join(OUT, name), "w") as f:
            for a, b in chosen:
                right = a + b
                wrong = wrong_answer(rng, right)
                if wrong == right:
                    wrong = right + 1
                q = rng.choice(TEMPLATES).format(a=a, b=b)
                order = rng.random() < 0.5                 # the chosen reply is not always listed first
                resp = [[str(right)], [str(wrong)]] if order else [[str(wrong)], [str(right)]]
                f.write(json.dumps({"src": [q], "tgt": [], "response": resp, "sort": [1, 0] if order else [0, 1]}) + "\n")


if __name__ == "__main__":
    main()
