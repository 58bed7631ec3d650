#!/usr/bin/env bats
# The whole chain as a user drives it: pack -> pretrain -> LoRA SFT -> merge -> load and serve.

setup() {
  load test_helper
  cd "$BATS_TEST_TMPDIR"
  jsonl_docs 80 docs.jsonl
  for a in 1 2 3 4 5 6 7 8; do for b in 1 2 3 4; do
    printf '{"src": ["What is %d + %d?"], "tgt": ["%d"]}\n' "$a" "$b" "$((a + b))"
  done; done > sft.jsonl
}

@test "pack | pretrain | sft --lora | merge gives a checkpoint equal to base + adapter, servable over HTTP" {
  run --separate-stderr bats_pipe cat docs.jsonl \| ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o data/pt -q -
  assert_success
  run --separate-stderr ernie-pack sft --tokenizer "$TOKENIZER" --seq-len 64 -o data/sft -q sft.jsonl
  assert_success
  run --separate-stderr bats_pipe ernie-train pretrain --data data/pt --init-config ernie-tiny --tokenizer "$TOKENIZER" \
    -o runs/pt --max-steps 3 -q \| jq -r .checkpoint
  assert_success
  base="$output"
  run --separate-stderr bats_pipe ernie-train sft --data data/sft --model "$base" --lora --lora-rank 4 -o runs/sft \
    --max-steps 3 --learning-rate 1e-2 -q \| jq -r .checkpoint
  assert_success
  adapter="$output"
  assert [ -f "$adapter/adapter_model.safetensors" ]
  run --separate-stderr bats_pipe ernie-merge --base "$base" --adapter "$adapter" -o merged --layout paddle -q \| jq -r .tensors_merged
  assert_success
  assert [ "$output" -gt 0 ]
  # the merged checkpoint computes what base + adapter computes
  run --separate-stderr python - "$base" "$adapter" merged <<'EOF'
import sys
import libernie  # noqa: F401  (first: CPU thread defaults before paddle loads)
import numpy as np
import paddle
from libernie.model import ErnieForCausalLM
ids = paddle.to_tensor([[1, 50, 60, 70, 80, 90]])
with paddle.no_grad():
    a = ErnieForCausalLM.from_pretrained(sys.argv[1], adapter=sys.argv[2])(ids).logits.numpy()
    b = ErnieForCausalLM.from_pretrained(sys.argv[3])(ids).logits.numpy()
print(float(np.abs(a - b).max()) < 1e-5)
EOF
  assert_output "True"
  assert [ -f merged/tokenizer.model ]
  # and ernie-serve answers a chat request from it
  port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  ernie-serve merged --port "$port" -q >serve.out 2>serve.err 3>&- &
  pid=$!
  wait_healthy "http://127.0.0.1:$port"
  run bats_pipe curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 4}' \| jq -r '.usage.completion_tokens'
  kill -TERM "$pid"; wait "$pid"
  assert_success
  assert [ "$output" -ge 1 ]
}

@test "the same chain on a tiny MoE: pretrain | sft --lora on routed and shared experts | merge | quant | serve" {
  run --separate-stderr ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o data/pt -q docs.jsonl
  assert_success
  run --separate-stderr ernie-pack sft --tokenizer "$TOKENIZER" --seq-len 64 -o data/sft -q sft.jsonl
  assert_success
  run --separate-stderr bats_pipe ernie-train pretrain --data data/pt --init-config ernie-tiny-moe \
    --tokenizer "$TOKENIZER" -o runs/pt --max-steps 2 --logging-steps 1 -q \| jq -r .checkpoint
  assert_success
  base="$output"
  run jq -r .model_type "$base/config.json"
  assert_output "ernie4_5_moe"
  # every step logs each MoE layer's tokens per expert: 8 counts summing to k=2 x the step's tokens
  run jq -s -r 'map(.moe_load["layer.1"].tokens | length) | unique | @tsv' runs/pt/metrics.jsonl
  assert_output "8"
  run jq -s '(map(.moe_load["layer.2"].tokens | add) | add) == 2 * .[-1].tokens_seen' runs/pt/metrics.jsonl
  assert_output "true"
  run --separate-stderr bats_pipe ernie-train sft --data data/sft --model "$base" --lora --lora-rank 4 \
    --lora-target-modules qkv_proj,experts.up_gate_proj,shared_experts.down_proj -o runs/sft \
    --max-steps 2 --learning-rate 1e-2 -q \| jq -r .checkpoint
  assert_success
  adapter="$output"
  run bats_pipe jq -r '.modules[]' "$adapter/adapter_config.json" \| grep -c 'mlp.experts.[0-9]*.up_gate_proj'
  assert_output "16"  # 8 experts x 2 MoE layers
  run --separate-stderr bats_pipe ernie-merge --base "$base" --adapter "$adapter" -o merged -q \| jq -r .tensors_merged
  assert_success
  assert_output "21"  # qkv x 3 layers + 16 expert up_gate + 2 shared down
  run --separate-stderr python - "$base" "$adapter" merged <<'EOF'
import sys
import libernie  # noqa: F401  (first: CPU thread defaults before paddle loads)
import numpy as np
import paddle
from libernie.model import ErnieForCausalLM
ids = paddle.to_tensor([[1, 50, 60, 70, 80, 90]])
with paddle.no_grad():
    a = ErnieForCausalLM.from_pretrained(sys.argv[1], adapter=sys.argv[2])(ids).logits.numpy()
    b = ErnieForCausalLM.from_pretrained(sys.argv[3])(ids).logits.numpy()
print(float(np.abs(a - b).max()) < 1e-5)
EOF
  assert_output "True"
  # wint8: 44 Linears = 6 attention + 2 dense MLP + 2 MoE layers x (8 experts + 1 shared) x 2
  run --separate-stderr bats_pipe ernie-quant wint8 --model merged -o q8 -q \| jq -r .quantized
  assert_success
  assert_output "44"
  run bats_pipe jq -r '.weight_map | keys[]' q8/model.safetensors.index.json \
    \| grep -cE '^ernie\.layers\.[12]\.mlp\.experts\.[0-7]\.(up_gate|down)_proj\.(quant_weight|weight_scale)$'
  assert_output "64"  # 2 layers x 8 experts x 2 projections x 2 tensors, FastDeploy's names
  run bats_pipe jq -r '.weight_map | keys[]' q8/model.safetensors.index.json \| grep -cE 'mlp\.(gate|moe_statics)\.'
  assert_output "4"   # router gate + correction bias of both MoE layers, kept in float (F32: checked in pytest)
  port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  ernie-serve q8 --port "$port" -q >serve.out 2>serve.err 3>&- &
  pid=$!
  wait_healthy "http://127.0.0.1:$port"
  run bats_pipe curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "What is 2 + 3?", "max_tokens": 4, "temperature": 0}' \| jq -r '.usage.completion_tokens'
  kill -TERM "$pid"; wait "$pid"
  assert_success
  assert [ "$output" -ge 1 ]
}

@test "ernie-pack dpo | ernie-train dpo-ref | ernie-train dpo --lora | ernie-merge gives base + DPO adapter" {
  for a in 1 2 3 4 5 6 7 8; do for b in 1 2 3; do
    printf '{"question": "What is %d + %d?", "chosen": "%d", "rejected": "%d"}\n' "$a" "$b" "$((a + b))" "$((a + b + 1))"
  done; done > pairs.jsonl
  run --separate-stderr bats_pipe cat pairs.jsonl \| ernie-pack dpo --tokenizer "$TOKENIZER" --seq-len 64 -o data/dpo -q - \| jq -r .mode
  assert_success
  assert_output "dpo"
  run --separate-stderr bats_pipe cat docs.jsonl \| ernie-pack pretrain --tokenizer "$TOKENIZER" --seq-len 64 -o data/pt -q -
  assert_success
  run --separate-stderr bats_pipe ernie-train pretrain --data data/pt --init-config ernie-tiny --tokenizer "$TOKENIZER" \
    -o runs/pt --max-steps 2 -q \| jq -r .checkpoint
  assert_success
  base="$output"
  run --separate-stderr bats_pipe ernie-train dpo-ref --data data/dpo --model "$base" -q \| jq -r '"\(.pairs) \(.output)"'
  assert_success
  assert_output "24 data/dpo.ref-logps.safetensors"
  run --separate-stderr bats_pipe ernie-train dpo --data data/dpo --model "$base" --lora --lora-rank 4 \
    --ref-logps data/dpo.ref-logps -o runs/dpo --max-steps 3 --logging-steps 1 --learning-rate 1e-2 -q \| jq -r .checkpoint
  assert_success
  adapter="$output"
  assert [ -f "$adapter/adapter_model.safetensors" ]
  run jq -s 'map(has("rewards/accuracies") and has("rewards/margins") and has("logps/chosen")) | all' runs/dpo/metrics.jsonl
  assert_output "true"
  run --separate-stderr bats_pipe ernie-merge --base "$base" --adapter "$adapter" -o merged -q \| jq -r .tensors_merged
  assert_success
  assert [ "$output" -gt 0 ]
  run --separate-stderr python - "$base" "$adapter" merged <<'EOF2'
import sys
import libernie  # noqa: F401
import numpy as np
import paddle
from libernie.model import ErnieForCausalLM
ids = paddle.to_tensor([[1, 50, 60, 70, 80, 90]])
with paddle.no_grad():
    a = ErnieForCausalLM.from_pretrained(sys.argv[1], adapter=sys.argv[2])(ids).logits.numpy()
    b = ErnieForCausalLM.from_pretrained(sys.argv[3])(ids).logits.numpy()
print(float(np.abs(a - b).max()) < 1e-5)
EOF2
  assert_output "True"
}
