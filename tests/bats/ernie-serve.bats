#!/usr/bin/env bats
# ernie-serve as a user runs it: start it on loopback, talk to it with curl and ernie-chat, stop it.

# One tiny checkpoint and one server for the file; each test works in its own $BATS_TEST_TMPDIR.
setup_file() {
  load test_helper
  export CKPT="$BATS_FILE_TMPDIR/tiny"
  python - "$CKPT" "$TOKENIZER" <<'EOF'
import sys
import libernie  # noqa: F401
from libernie.config import ernie_tiny
from libernie.model import ErnieForCausalLM
from libernie.tokenizer import ErnieTokenizer
tok = ErnieTokenizer.from_pretrained(sys.argv[2])
ErnieForCausalLM(ernie_tiny(vocab_size=tok.vocab_size)).save_pretrained(sys.argv[1], layout="paddle")
tok.save_pretrained(sys.argv[1])
EOF
  export PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  export URL="http://127.0.0.1:$PORT" KEY="bats-key"
  ernie-serve "$CKPT" --port "$PORT" --api-key "$KEY" --max-model-len 256 \
    >"$BATS_FILE_TMPDIR/serve.out" 2>"$BATS_FILE_TMPDIR/serve.err" 3>&- &
  echo $! >"$BATS_FILE_TMPDIR/serve.pid"
  wait_healthy "$URL"
}

teardown_file() {
  kill -TERM "$(cat "$BATS_FILE_TMPDIR/serve.pid")" 2>/dev/null || true
  wait "$(cat "$BATS_FILE_TMPDIR/serve.pid")" 2>/dev/null || true
}

setup() {
  load test_helper
  cd "$BATS_TEST_TMPDIR"
}

chat_body='{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}'

@test "GET /health is 200 and needs no key" {
  run --separate-stderr curl -s -w '\n%{http_code}' "$URL/health"
  assert_success
  assert_output $'{"status":"ok"}\n200'
}

@test "curl chat completion | jq gives the reply, usage and finish_reason" {
  run --separate-stderr bats_pipe curl -s "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' -d "$chat_body" \| jq -r '[.object, .choices[0].finish_reason, .usage.total_tokens == .usage.prompt_tokens + .usage.completion_tokens] | @tsv'
  assert_success
  assert_output --regexp $'^chat.completion\t(stop|length)\ttrue$'
}

@test "a streamed completion is SSE data lines ending in data: [DONE]" {
  run --separate-stderr bats_pipe curl -sN "$URL/v1/completions" -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' -d '{"prompt": "Hi", "max_tokens": 4, "stream": true}' \| grep -c '^data: {'
  assert_success
  assert [ "$output" -ge 1 ]
  run bats_pipe curl -sN "$URL/v1/completions" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"prompt": "Hi", "max_tokens": 4, "stream": true}' \| grep -v '^$' \| tail -n 1
  assert_output 'data: [DONE]'
}

@test "malformed JSON is a 400 with an OpenAI error body" {
  run --separate-stderr curl -s -o body.json -w '%{http_code}' "$URL/v1/completions" \
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d '{"prompt": '
  assert_output 400
  run jq -r '.error | [.type, .code] | @tsv' body.json
  assert_output $'invalid_request_error\tinvalid_json'
}

@test "no API key is a 401; the server keeps serving" {
  run --separate-stderr curl -s -o body.json -w '%{http_code}' "$URL/v1/models"
  assert_output 401
  run jq -r .error.code body.json
  assert_output invalid_api_key
  run --separate-stderr bats_pipe curl -s "$URL/v1/models" -H "Authorization: Bearer $KEY" \| jq -r '.data[0].id'
  assert_output tiny
}

@test "/metrics is Prometheus text with request and token counters" {
  run --separate-stderr bats_pipe curl -s "$URL/metrics" \| grep -E '^ernie_serve_(requests|generation_tokens)_total'
  assert_success
  assert_output --partial 'ernie_serve_generation_tokens_total'
}

@test "printf | ernie-chat prints the reply the API gives" {
  expected="$(curl -s "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}' | jq -r '.choices[0].message.content')"
  run --separate-stderr bats_pipe printf 'Hello\n' \| ernie-chat --url "$URL" --api-key "$KEY" --temperature 0 --max-tokens 6
  assert_success
  assert_output "$expected"
}

@test "ernie-serve on a directory that is not a checkpoint exits 1 with one line" {
  mkdir empty
  run --separate-stderr ernie-serve empty
  assert_failure 1
  assert_equal "$(printf '%s\n' "$stderr" | grep -c .)" 1
  [[ "$stderr" == "Error: empty"* ]]
}

@test "SIGTERM finishes the running request, exits 0 and prints a JSON summary" {
  port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  ernie-serve "$CKPT" --port "$port" -q >serve.out 2>serve.err 3>&- &
  pid=$!
  wait_healthy "http://127.0.0.1:$port"
  curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "x", "max_tokens": 200, "ignore_eos": true}' >reply.json 3>&- &
  curl_pid=$!
  for _ in $(seq 1 100); do  # until the request is in the batch
    curl -s "http://127.0.0.1:$port/metrics" | grep -q '^ernie_serve_num_requests_running 1.0' && break
    sleep 0.05
  done
  kill -TERM "$pid"
  code=0
  wait "$pid" || code=$?
  assert_equal "$code" 0
  wait "$curl_pid"
  run jq .usage.completion_tokens reply.json
  assert_output 200
  run jq -r '.model' serve.out
  assert_output tiny
}

@test "ernie-serve --tokenizer takes a .model file of any name; a missing one is one line, exit 1" {
  run --separate-stderr ernie-serve "$CKPT" --tokenizer nowhere.model
  assert_failure 1
  assert_equal "$stderr" "Error: nowhere.model: no such file or directory; pass a directory containing tokenizer.model or the .model file"
}
