#!/usr/bin/env bats
# ernie-pack as a user runs it: in pipelines, from files, with bad input.

setup() {
  load test_helper
  cd "$BATS_TEST_TMPDIR"
  jsonl_docs 40 docs.jsonl
}

@test "cat docs.jsonl | ernie-pack pretrain - writes a manifest and prints one JSON summary" {
  run --separate-stderr bats_pipe cat docs.jsonl \| ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 128 -o out/d -
  assert_success
  assert_output --partial '"documents":40'
  assert_equal "$(printf '%s\n' "$output" | wc -l)" 1
  assert [ -f out/d.json ] && [ -f out/d-00000.npy ] && [ -f out/d-00000.idx ]
}

@test "zcat docs.jsonl.gz | ernie-pack reads stdin with no INPUT" {
  gzip -k docs.jsonl
  run --separate-stderr bats_pipe zcat docs.jsonl.gz \| ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 128 -o out/z -q
  assert_success
  assert_equal "$stderr" ""
  run cmp out/z-00000.npy <(ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 128 -o out/p -q docs.jsonl >/dev/null; cat out/p-00000.npy)
  assert_success
}

@test "ernie-pack ... | jq .tokens prints the token count" {
  run --separate-stderr bats_pipe ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o out/d -q docs.jsonl \| jq .tokens
  assert_success
  assert_output --regexp '^[0-9]+$'
  tokens="$output"
  run jq .counts.tokens out/d.json
  assert_output "$tokens"
}

@test ".gz and .zst inputs give the same shards as plain JSONL" {
  gzip -k docs.jsonl
  zstd -q docs.jsonl -o docs.jsonl.zst
  ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o out/plain -q docs.jsonl
  ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o out/gz -q docs.jsonl.gz
  ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o out/zst -q docs.jsonl.zst
  run cmp out/plain-00000.npy out/gz-00000.npy
  assert_success
  run cmp out/plain-00000.npy out/zst-00000.npy
  assert_success
}

@test "bad input stops with Error: FILE:LINE, exit 1, and no manifest" {
  printf '{"text": "fine"}\n{"text": \n' > bad.jsonl
  run --separate-stderr ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o out/d bad.jsonl
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" "Error: bad.jsonl:2: invalid JSON (unexpected end of data); fix the record or pass --skip-bad to count and skip it"
  assert [ ! -e out/d.json ]
}

@test "--skip-bad counts the reason in the summary" {
  printf '{"text": "fine"}\n{"nope": 1}\n\n' > bad.jsonl
  run --separate-stderr bats_pipe ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o out/d -q --skip-bad bad.jsonl \| jq -c .skipped
  assert_success
  assert_output '{"missing_field":1}'
}

@test "a usage error exits 2" {
  run --separate-stderr ernie-pack pretrain --seq-len 64 -o out/d docs.jsonl
  assert_failure 2
  assert_stderr --partial "Missing option '--tokenizer'"
}

@test "ernie-pack inspect | head ends cleanly" {
  ernie-pack sft --tokenizer "$TOKENIZER" --seq-len 256 -o out/s -q <<< '{"instruction": "Say hi", "output": "Hi!"}' > /dev/null
  run --separate-stderr bats_pipe ernie-pack inspect out/s \| head -n 1
  assert_success
  assert_output --partial "out/s: sft, seq_len 256"
  assert_equal "$stderr" ""
}

@test "an empty input file is one line, exit 1, and nothing written" {
  : > empty.jsonl
  run --separate-stderr ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o out/e empty.jsonl
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" "Error: empty.jsonl: no records to pack; nothing was written; pass --allow-empty to write an empty dataset"
  assert [ ! -e out ]
}

@test "only blank lines on stdin is empty too; --allow-empty writes an empty dataset" {
  run --separate-stderr bats_pipe printf '\n\n' \| ernie-pack sft --tokenizer "$TOKENIZER" --seq-len 64 -o out/e -
  assert_failure 1
  assert_equal "$stderr" "Error: stdin: no records to pack (2 blank lines); nothing was written; pass --allow-empty to write an empty dataset"
  assert [ ! -e out ]
  run --separate-stderr bats_pipe printf '\n\n' \| ernie-pack sft --tokenizer "$TOKENIZER" --seq-len 64 -o out/e -q --allow-empty - \| jq .sequences
  assert_success
  assert_output "0"
  run jq -c .shards out/e.json
  assert_output "[]"
}

@test "an output that cannot be created fails before the input is read" {
  printf '{"text": \n' > bad.jsonl   # reading it would fail on line 1
  run --separate-stderr ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o /proc/nope/x bad.jsonl
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" "Error: /proc/nope/x: cannot create /proc/nope under /proc (No such file or directory); choose another output path"
}

@test "--tokenizer takes any .model file, with the same result as its directory" {
  cp "$TOKENIZER/tokenizer.model" tok.model
  ernie-pack pretrain --tokenizer tok.model --seq-len 64 -o out/f -q docs.jsonl >/dev/null
  ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o out/d -q docs.jsonl >/dev/null
  run cmp out/f-00000.npy out/d-00000.npy
  assert_success
}
