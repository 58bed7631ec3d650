#!/usr/bin/env bash
# Build .venv-oracle: transformers on CPU torch, the independent implementation our numbers are checked against.
# torch comes only from a local CPU wheel (--no-index): pip must never pull a multi-GB CUDA build.
# On failure we leave .venv-oracle/SKIP with the reason; the oracle tests print it and skip.
set -u
venv=${1:-.venv-oracle}
py=${PYTHON:-python3}
fail() { mkdir -p "$venv"; echo "$1" > "$venv/SKIP"; echo "oracle: $1" >&2; exit 0; }
rm -f "$venv/SKIP"
[ -x "$venv/bin/python" ] || $py -m venv "$venv" || fail "could not create $venv"
"$venv/bin/pip" install -q --no-index --no-deps torch==2.13.0 \
  || fail "no local CPU wheel for torch==2.13.0 (pip install --no-index found none); refusing to pull a CUDA torch"
"$venv/bin/pip" install -q -r requirements/oracle.txt || fail "pip could not install requirements/oracle.txt"
"$venv/bin/python" -c 'import torch,sys; sys.exit(0 if torch.version.cuda is None else 1)' \
  || fail "the torch in $venv is a CUDA build; remove $venv and install a CPU wheel"
touch "$venv/.installed"
