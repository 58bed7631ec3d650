#!/usr/bin/env bats
# ernie-merge as a user runs it: merge, convert, pipe the summary into jq, and fail cleanly on bad input.

setup_file() {
  # One tiny HF-layout base (tied, with tokenizer side files) and one ernie-train adapter, shared read-only.
  export FIXTURES="$BATS_FILE_TMPDIR"
  "${BATS_TEST_DIRNAME}/../../.venv/bin/python" - "$FIXTURES" <<'EOF'
import sys, paddle
from libernie.config import ernie_tiny
from libernie.model import ErnieForCausalLM
from libernie.lora import LoRAConfig, apply_lora, lora_parameters, save_adapter
root = sys.argv[1]
paddle.seed(0)
m = ErnieForCausalLM(ernie_tiny(vocab_size=64))
m.save_pretrained(f"{root}/base", layout="hf", max_shard_size="40KB")
open(f"{root}/base/tokenizer_config.json", "w").write('{"chat_template": "{{ messages }}"}\n')
open(f"{root}/base/tokenizer.model", "wb").write(b"\x00spm\xff")
cfg = LoRAConfig(r=4)
apply_lora(m, cfg)
for p in lora_parameters(m).values():
    p.set_value(paddle.randn(p.shape) * 0.1)
save_adapter(m, cfg, f"{root}/adapter", base_model=f"{root}/base")
EOF
}

setup() {
  load test_helper
  cd "$BATS_TEST_TMPDIR"
}

@test "ernie-merge writes the merged model and prints one JSON summary" {
  run --separate-stderr ernie-merge --base "$FIXTURES/base" --adapter "$FIXTURES/adapter" -o merged
  assert_success
  assert_equal "$(printf '%s\n' "$output" | wc -l)" 1
  assert_output --partial '"tensors_merged":8'
  assert_stderr --regexp '^ernie-merge: [0-9]+ tensor groups .* done$'
  assert [ -f merged/config.json ] && [ -f merged/model.safetensors.index.json ]
  run cmp merged/tokenizer.model "$FIXTURES/base/tokenizer.model"
  assert_success
  run cmp merged/tokenizer_config.json "$FIXTURES/base/tokenizer_config.json"
  assert_success
}

@test "ernie-merge --verify | jq: the merged logits match base + adapter" {
  run --separate-stderr bats_pipe ernie-merge --base "$FIXTURES/base" --adapter "$FIXTURES/adapter" -o merged -q \
    --verify \| jq '.verify.max_abs_diff < 1e-5'
  assert_success
  assert_output "true"
  assert_equal "$stderr" ""
}

@test "--layout paddle then back to hf keeps every tensor name" {
  ernie-merge --base "$FIXTURES/base" -o paddle --layout paddle -q > /dev/null
  run jq -r '.architectures[0]' paddle/config.json
  assert_output "Ernie4_5_ForCausalLM"
  ernie-merge --base paddle -o hf --layout hf -q > /dev/null
  run diff <(jq -S '.weight_map | keys' hf/model.safetensors.index.json) \
           <(jq -S '.weight_map | keys' "$FIXTURES/base/model.safetensors.index.json")
  assert_success
}

@test "an existing OUTDIR is refused without --force" {
  mkdir merged
  run --separate-stderr ernie-merge --base "$FIXTURES/base" --adapter "$FIXTURES/adapter" -o merged
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" "Error: merged: already exists; choose another path or pass --force"
  run --separate-stderr ernie-merge --base "$FIXTURES/base" --adapter "$FIXTURES/adapter" -o merged --force -q
  assert_success
}

@test "a truncated base shard is one error naming the file" {
  cp -r "$FIXTURES/base" base
  shard=$(ls base/model-*.safetensors | tail -n 1)
  truncate -s -16 "$shard"
  run --separate-stderr ernie-merge --base base --adapter "$FIXTURES/adapter" -o merged
  assert_failure 1
  assert_equal "$(printf '%s\n' "$stderr" | wc -l)" 1
  assert_stderr --regexp "^Error: base/model-[0-9-]+of-[0-9]+\.safetensors: truncated or corrupt at tensor .*; re-copy the file$"
  assert [ ! -e merged ]
}

@test "a usage error exits 2" {
  run --separate-stderr ernie-merge --base "$FIXTURES/base" -o merged --layout torch
  assert_failure 2
  assert_stderr --partial "Invalid value for '--layout'"
}

@test "an OUTDIR that cannot be created fails before the base is read, in one line" {
  run --separate-stderr ernie-merge --base no/such/base -o /proc/nope/merged
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" "Error: /proc/nope/merged: cannot create /proc/nope/merged under /proc (No such file or directory); choose another output path"
}
