# Shared set-up for the bats suites: bats-support/bats-assert from .bats/ (make bats-deps), tools on PATH,
# every test in its own $BATS_TEST_TMPDIR.
bats_require_minimum_version 1.5.0
REPO_ROOT="$(cd "$(dirname "${BATS_TEST_FILENAME}")/../.." && pwd)"
load "${REPO_ROOT}/.bats/node_modules/bats-support/load.bash"
load "${REPO_ROOT}/.bats/node_modules/bats-assert/load.bash"
export PATH="${REPO_ROOT}/.venv/bin:${PATH}"
TOKENIZER="${REPO_ROOT}/assets/tokenizer"

# jsonl_docs N FILE: N pretrain records {"text": "document K ..."}.
jsonl_docs() {
  local n="$1" file="$2"
  for ((k = 0; k < n; k++)); do
    printf '{"text": "Document %d says the river is %d meters wide and the bridge is older than the mill."}\n' "$k" "$k"
  done > "$file"
}

# wait_healthy URL: poll /health for up to 60 s.
wait_healthy() {
  for _ in $(seq 1 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1/health")" = 200 ] && return 0
    sleep 0.2
  done
  return 1
}
