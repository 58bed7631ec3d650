#!/usr/bin/env bats
# ernie-train as a user runs it: from packed shards, with a YAML config, piping its JSON summary.

setup() {
  load test_helper
  cd "$BATS_TEST_TMPDIR"
  jsonl_docs 60 docs.jsonl
  ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o data/pt -q docs.jsonl >/dev/null
}

@test "pretrain from a preset prints one JSON summary whose checkpoint loads" {
  run --separate-stderr ernie-train pretrain --data data/pt --init-config ernie-tiny --tokenizer "$TOKENIZER" \
    -o run --max-steps 3 --logging-steps 1 -q
  assert_success
  assert_equal "$stderr" ""
  assert_equal "$(printf '%s\n' "$output" | wc -l)" 1
  ckpt=$(printf '%s' "$output" | jq -r .checkpoint)
  assert [ -f "$ckpt/model.safetensors.index.json" ] && [ -f "$ckpt/tokenizer.model" ]
  run python -c "import libernie; from libernie.model import ErnieForCausalLM as M; print(M.from_pretrained('$ckpt').config.num_hidden_layers)"
  assert_output "2"
  run jq -s length run/metrics.jsonl
  assert_output "3"
}

@test "a YAML config is read and flags override it" {
  printf 'data: data/pt\ninit_config: ernie-tiny\ntokenizer: %s\noutput_dir: run\nmax_steps: 5\nlearning_rate: 1e-3\n' \
    "$TOKENIZER" > train.yaml
  run --separate-stderr bats_pipe ernie-train pretrain --config train.yaml --max-steps 2 -q \| jq .steps
  assert_success
  assert_output "2"
  run jq .learning_rate run/train_config.json
  assert_output "0.001"
}

@test "an unknown YAML key is a one-line error and exit 1" {
  printf 'data: data/pt\nlearning_rat: 1\n' > bad.yaml
  run --separate-stderr ernie-train pretrain --config bad.yaml -o run
  assert_failure 1
  assert_equal "$stderr" "Error: bad.yaml: unknown option 'learning_rat'; see \`ernie-train pretrain --help\`"
}

@test "training on shards packed for another mode is refused" {
  run --separate-stderr ernie-train sft --data data/pt --init-config ernie-tiny --tokenizer "$TOKENIZER" -o run -q
  assert_failure 1
  assert_equal "$(printf '%s\n' "$stderr" | wc -l)" 1
  assert_regex "$stderr" "packed for 'pretrain'"
  assert [ ! -e run ]
}

@test "dpo refuses a reference cache made for other shards, in one line" {
  printf '{"question": "Is %d even?", "chosen": "yes", "rejected": "no"}\n' 2 4 6 8 > a.jsonl
  printf '{"question": "Is %d odd?", "chosen": "yes", "rejected": "no"}\n' 1 3 5 7 > b.jsonl
  ernie-pack dpo --tokenizer "$TOKENIZER" --seq-len 64 -o data/a -q a.jsonl >/dev/null
  ernie-pack dpo --tokenizer "$TOKENIZER" --seq-len 64 -o data/b -q b.jsonl >/dev/null
  base=$(ernie-train pretrain --data data/pt --init-config ernie-tiny --tokenizer "$TOKENIZER" -o pt --max-steps 1 -q | jq -r .checkpoint)
  run --separate-stderr ernie-train dpo-ref --data data/b --model "$base" -q
  assert_success
  run --separate-stderr ernie-train dpo --data data/a --model "$base" --ref-logps data/b.ref-logps -o run -q
  assert_failure 1
  assert_equal "$(printf '%s\n' "$stderr" | wc -l)" 1
  assert_regex "$stderr" "^Error: data/b.ref-logps.safetensors: made for data sha256 .*rerun \`ernie-train dpo-ref\` on these shards$"
  assert [ ! -e run ]
}

@test "--tokenizer takes any .model file, as ernie-pack does" {
  cp "$TOKENIZER/tokenizer.model" tok.model
  run --separate-stderr bats_pipe ernie-train pretrain --data data/pt --init-config ernie-tiny --tokenizer tok.model \
    -o run --max-steps 1 -q \| jq -r .checkpoint
  assert_success
  run cmp "$output/tokenizer.model" tok.model
  assert_success
}

@test "a diverging run stops: one line naming the step and last good checkpoint, exit 1, strict JSON metrics" {
  run --separate-stderr ernie-train pretrain --data data/pt --init-config ernie-tiny --tokenizer "$TOKENIZER" -o run \
    --max-steps 6 --logging-steps 1 --save-steps 1 --learning-rate 1e6 --max-grad-norm 0 -q
  assert_failure 1
  assert_output ""
  assert_equal "$(printf '%s\n' "$stderr" | wc -l)" 1
  assert_regex "$stderr" "^Error: step ([0-9]+): non-finite loss .* \(last good checkpoint: run/checkpoint-[0-9]+\)"
  bad=$(printf '%s' "$stderr" | sed -E 's/^Error: step ([0-9]+):.*/\1/')
  assert [ ! -e "run/$(printf 'checkpoint-%08d' "$bad")" ]
  run jq -c 'select(.grad_norm == null or .loss == null) | .step' run/metrics.jsonl   # jq parses every line
  assert_success
  assert_output "$bad"
}

@test "--skip-nan-inf-steps skips bad steps and counts them in metrics.jsonl" {
  run --separate-stderr bats_pipe ernie-train pretrain --data data/pt --init-config ernie-tiny --tokenizer "$TOKENIZER" \
    -o run --max-steps 5 --logging-steps 1 --learning-rate 1e6 --max-grad-norm 0 --skip-nan-inf-steps 10 -q \| jq .skipped_steps
  assert_success
  skipped="$output"
  assert [ "$skipped" -gt 0 ]
  run jq -s -c 'map(.skipped_steps) | max' run/metrics.jsonl
  assert_output "$skipped"
}

@test "an output directory that cannot be created fails before the data is read" {
  run --separate-stderr ernie-train pretrain --data no/such/data --init-config ernie-tiny --tokenizer "$TOKENIZER" \
    -o /proc/nope/run -q
  assert_failure 1
  assert_equal "$stderr" "Error: /proc/nope/run: cannot create /proc/nope/run under /proc (No such file or directory); choose another output path"
}
