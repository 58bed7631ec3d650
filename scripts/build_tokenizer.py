#!/usr/bin/env python3
"""Train the tiny demo tokenizer from the shipped corpus.

    .venv/bin/python scripts/build_tokenizer.py --vocab-size 2048 -o assets/tokenizer

Reads assets/corpus/*.txt in sorted order and writes tokenizer.model, tokenizer_config.json and
special_tokens_map.json. Deterministic: rerunning gives a byte-identical tokenizer.model, which
tests/libernie/test_tokenizer.py checks against the committed assets/tokenizer/.
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a fresh clone without `pip install -e .`

from libernie.errors import TokenizerError  # noqa: E402
from libernie.tokenizer import train_tokenizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=2048, help="pieces in the model (default 2048)")
    ap.add_argument("--corpus", default=str(REPO / "assets" / "corpus"), help="directory of *.txt files")
    ap.add_argument("-o", "--output", default=str(REPO / "assets" / "tokenizer"), help="tokenizer directory to write")
    args = ap.parse_args(argv)
    files = sorted(str(p) for p in Path(args.corpus).glob("*.txt"))
    if not files:
        print(f"Error: {args.corpus}: no *.txt files; pass --corpus DIR with UTF-8 text", file=sys.stderr)
        return 1
    try:
        tok = train_tokenizer(files, args.output, vocab_size=args.vocab_size)
    except TokenizerError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    summary = {"output": args.output, "vocab_size": tok.vocab_size, "sha256": tok.sha256,
               "files": [Path(f).name for f in files]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
