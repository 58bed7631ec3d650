#!/usr/bin/env bats
# ernie-quant as a user runs it: pack calibration text, quantize, read the summary with jq, serve the result.

setup_file() {
  load test_helper
  export FIXTURES="$BATS_FILE_TMPDIR"
  python - "$FIXTURES/base" "$TOKENIZER" <<'EOF'
import sys
import libernie  # noqa: F401
from libernie.config import ernie_tiny
from libernie.model import ErnieForCausalLM
from libernie.tokenizer import ErnieTokenizer
tok = ErnieTokenizer.from_pretrained(sys.argv[2])
ErnieForCausalLM(ernie_tiny(vocab_size=tok.vocab_size)).save_pretrained(sys.argv[1], layout="hf")
tok.save_pretrained(sys.argv[1])
EOF
  jsonl_docs 40 "$FIXTURES/docs.jsonl"
  ernie-pack pretrain -q --tokenizer "$TOKENIZER" --seq-len 64 -o "$FIXTURES/calib" "$FIXTURES/docs.jsonl" >/dev/null
}

setup() {
  load test_helper
  cd "$BATS_TEST_TMPDIR"
}

@test "ernie-quant wint8 | jq: one JSON summary, every decoder Linear quantized, smaller output" {
  run --separate-stderr bats_pipe ernie-quant wint8 --model "$FIXTURES/base" -o w8 \
    \| jq -r '[.quantized, .layout, (.bytes_after < .bytes_before), (.max_layer_error < 0.02)] | @tsv'
  assert_success
  assert_output $'8\tpaddle\ttrue\ttrue'
  assert_stderr --partial 'ernie-quant write:'
  assert [ -f w8/config.json ] && [ -f w8/tokenizer.model ]
  run jq -r '.quantization_config | [.dense_quant_type, .is_quantized] | @tsv' w8/config.json
  assert_output $'wint8\ttrue'
}

@test "ernie-quant fp8 --eval | jq: perplexity of base and quantized on the same shards" {
  run --separate-stderr bats_pipe ernie-quant fp8 -q --model "$FIXTURES/base" --calib "$FIXTURES/calib" \
    --eval "$FIXTURES/calib" --eval-samples 4 --format compressed-tensors -o f8 \
    \| jq -r '[.format, (.eval.base_ppl > 1), (.eval.quant_ppl > 1), (.eval.ppl_delta_pct | fabs < 5)] | @tsv'
  assert_success
  assert_output $'compressed-tensors\ttrue\ttrue\ttrue'
  assert_equal "$stderr" ""
  run jq -r '.quantization_config.format' f8/config.json
  assert_output float-quantized
}

@test "fp8 without --calib is one line, exit 1, no output directory" {
  run --separate-stderr ernie-quant fp8 --model "$FIXTURES/base" -o f8
  assert_failure 1
  assert_stderr --regexp '^Error: fp8 needs --calib'
  assert_equal "$(printf '%s\n' "$stderr" | wc -l)" 1
  assert [ ! -e f8 ]
}

@test "an output path that cannot be created fails before the model is read" {
  run --separate-stderr ernie-quant wint8 --model does-not-exist -o /proc/nope/x
  assert_failure 1
  assert_stderr --regexp '^Error: /proc/nope/x: '
  assert_equal "$(printf '%s\n' "$stderr" | wc -l)" 1
}

@test "ernie-serve runs the quantized model over the OpenAI API" {
  ernie-quant wint4 -q --group-size 16 --model "$FIXTURES/base" -o w4 >summary.json
  port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  ernie-serve w4 --port "$port" -q --max-model-len 128 >serve.out 2>serve.err 3>&- &
  pid=$!
  wait_healthy "http://127.0.0.1:$port"
  run --separate-stderr bats_pipe curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "The river", "max_tokens": 6, "temperature": 0, "ignore_eos": true}' \| jq -r '.usage.completion_tokens'
  kill -TERM "$pid"
  wait "$pid" || true
  assert_success
  assert_output 6
}

@test "ernie-quant wint8 --quantize-embeddings | jq, then ernie-serve answers from the int8 embedding" {
  ernie-quant wint8 -q --model "$FIXTURES/base" -o w8 >w8.json
  run --separate-stderr bats_pipe ernie-quant wint8 -q --quantize-embeddings --model "$FIXTURES/base" -o w8e \
    \| jq -r --argjson w8 "$(jq .bytes_after w8.json)" '[.quantize_embeddings, .quantized, (.bytes_after < $w8)] | @tsv'
  assert_success
  assert_output $'true\t9\ttrue'
  run jq -r '.quantization_config.ernie_tools.quantize_embeddings' w8e/config.json
  assert_output true
  port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  ernie-serve w8e --port "$port" -q --max-model-len 128 >serve.out 2>serve.err 3>&- &
  pid=$!
  wait_healthy "http://127.0.0.1:$port"
  run --separate-stderr bats_pipe curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "The river", "max_tokens": 5, "temperature": 0, "ignore_eos": true}' \| jq -r '.usage.completion_tokens'
  kill -TERM "$pid"
  wait "$pid" || true
  assert_success
  assert_output 5
}

@test "--quantize-embeddings with wint4 is one line, exit 1, no output directory" {
  run --separate-stderr ernie-quant wint4 --quantize-embeddings --model "$FIXTURES/base" -o w4
  assert_failure 1
  assert_stderr --regexp '^Error: --quantize-embeddings works with wint8 only'
  assert_equal "$(printf '%s\n' "$stderr" | wc -l)" 1
  assert [ ! -e w4 ]
}
