"""Deterministic little corpora for the ernie-pack tests (imported by name: pytest puts this folder on sys.path)."""
import random
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[3]


def sentences():
    return [s for s in (ROOT / "assets" / "corpus" / "sentences.txt").read_text().split("\n") if s.strip()]


def write_jsonl(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def pretrain_docs(n, seed=0, max_sentences=12):
    rng, pool = random.Random(seed), sentences()
    return [" ".join(rng.sample(pool, rng.randint(1, max_sentences))) for _ in range(n)]


def sft_records(n, seed=0):
    rng, pool = random.Random(seed), sentences()
    out = []
    for i in range(n):
        turns = rng.randint(1, 3)
        if i % 2:
            out.append({"system": "Answer briefly.", "src": rng.sample(pool, turns), "tgt": rng.sample(pool, turns),
                        "label": [rng.randint(0, 1) for _ in range(turns - 1)] + [1]})
        else:
            out.append({"instruction": rng.choice(pool), "input": rng.choice(["", "Be short."]),
                        "output": " ".join(rng.sample(pool, rng.randint(1, 4)))})
    return out


def dpo_records(n, seed=0):
    rng, pool = random.Random(seed), sentences()
    out = []
    for i in range(n):
        if i % 2:
            out.append({"src": rng.sample(pool, 2), "tgt": [rng.choice(pool)],
                        "response": [[rng.choice(pool)], [rng.choice(pool)]], "sort": [rng.random(), 0.5]})
        else:
            out.append({"question": rng.choice(pool), "chosen": rng.choice(pool), "rejected": rng.choice(pool)})
    return out
