"""Writes arithmetic.jsonl (train) and arithmetic-eval.jsonl: single- and two-digit sums in ERNIEKit's
SFT format, so the demo's fine-tune has answers a script can check. Deterministic; rerun to regenerate."""
import json
import os
import random

here = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(0)
pairs = [(a, b) for a in range(20) for b in range(20)]
rng.shuffle(pairs)
eval_pairs, train_pairs = pairs[:40], pairs[40:]
templates = ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?"]
for name, chosen in (("arithmetic.jsonl", train_pairs), ("arithmetic-eval.jsonl", eval_pairs)):
    with open(os.path.join(here, name), "w") as f:
        for a, b in chosen:
            q = rng.choice(templates).format(a=a, b=b)
            f.write(json.dumps({"src": [q], "tgt": [str(a + b)]}) + "\n")
