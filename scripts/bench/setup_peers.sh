#!/usr/bin/env bash
# Peers for the benchmarks, each in its own environment so none leaks into ours:
#   .venv-pf      PaddleFormers' Ernie4_5ForCausalLM on the same paddlepaddle 3.3.1 CPU build
#   .venv-oracle  transformers on CPU torch (made by `make oracle`)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}
if [ ! -f .venv-pf/.installed ]; then
  [ -x .venv-pf/bin/python ] || $py -m venv .venv-pf
  # paddleformers pins transformers<5.4 and pulls datasets/librosa; it never touches .venv.
  .venv-pf/bin/pip install -q paddlepaddle==3.3.1 paddleformers==1.2.0
  touch .venv-pf/.installed
fi
