#!/usr/bin/env bash
# `make demo MOE=1`: the chain on a tiny ERNIE 4.5 mixture-of-experts (ernie-tiny-moe: 3 layers, layers 1-2
# with 8 routed experts, top-2, one shared expert, aux-free balancing), on what the repo ships:
# pack -> pretrain (router loss + correction-bias updates, expert load in metrics.jsonl) -> LoRA SFT on the
# routed and shared experts -> merge -> quantize the experts (wint8, FastDeploy names) -> serve.
# Everything lands in demo-moe-out/ (or $DEMO_OUT). Rerunning starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${DEMO_OUT:-demo-moe-out}
PT_STEPS=${PT_STEPS:-150}
SFT_STEPS=${SFT_STEPS:-100}
TOK=assets/tokenizer
rm -rf "$OUT" && mkdir -p "$OUT"
say() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

say "1. pack the shipped corpus (pretrain) and arithmetic chats (SFT)"
cat assets/corpus/stories.txt assets/corpus/sentences.txt \
  | python -c 'import json,sys; [print(json.dumps({"text": l.strip()})) for l in sys.stdin if l.strip()]' \
  | ernie-pack pretrain -q --tokenizer "$TOK" --seq-len 128 --split 98,2,0 -o "$OUT/data/pt" - > /dev/null
ernie-pack sft -q --tokenizer "$TOK" --seq-len 128 -o "$OUT/data/sft" assets/sft/arithmetic.jsonl > /dev/null

say "2. pretrain ernie-tiny-moe ($PT_STEPS steps): aux loss 1e-5 + aux-free bias updates (coef 1e-3)"
ernie-train pretrain --data "$OUT/data/pt-train" --eval-data "$OUT/data/pt-valid" --init-config ernie-tiny-moe \
  --tokenizer "$TOK" -o "$OUT/pretrain" --max-steps "$PT_STEPS" --save-steps "$PT_STEPS" --logging-steps 10 \
  --learning-rate 3e-3 --warmup-steps 10 --per-device-train-batch-size 8 -q > "$OUT/pretrain.json"
BASE=$(jq -r .checkpoint "$OUT/pretrain.json")
jq -r '"eval loss \(.eval_loss | . * 1000 | round / 1000), ppl \(.eval_ppl | round) after \(.steps) steps"' "$OUT/pretrain.json"
echo "expert load balance (min/max tokens per expert, lowest MoE layer; 1.0 = even), every 10 steps:"
jq -r '"  step \(.step): \(.moe_min_max_ratio * 100 | round / 100)  layer.1 tokens \(.moe_load["layer.1"].tokens)"' \
  "$OUT/pretrain/metrics.jsonl" | sed -n '1p;5p;10p;$p'

say "3. LoRA SFT on attention, routed and shared experts ($SFT_STEPS steps)"
ernie-train sft --data "$OUT/data/sft" --model "$BASE" --lora --lora-rank 8 \
  --lora-target-modules qkv_proj,o_proj,experts.up_gate_proj,experts.down_proj,shared_experts.up_gate_proj,shared_experts.down_proj \
  -o "$OUT/sft" --max-steps "$SFT_STEPS" --save-steps "$SFT_STEPS" --logging-steps 10 --learning-rate 2e-3 \
  --per-device-train-batch-size 8 -q > "$OUT/sft.json"
ADAPTER=$(jq -r .checkpoint "$OUT/sft.json")
jq -r '"final sft loss \(.final_loss | . * 1000 | round / 1000)"' "$OUT/sft.json"

say "4. merge the adapter into the experts (Paddle layout, --verify against base + adapter)"
ernie-merge --base "$BASE" --adapter "$ADAPTER" -o "$OUT/merged" --layout paddle --verify -q \
  | jq -r '"merged \(.tensors_merged) tensors; max |logits diff| vs base+adapter \(.verify.max_abs_diff)"'

say "5. quantize (wint8): experts under FastDeploy's names, router gate and correction bias kept F32"
ernie-quant wint8 --model "$OUT/merged" -o "$OUT/merged-wint8" --eval "$OUT/data/pt-valid" -q \
  | jq -r '"\(.quantized) Linears, \(.bytes_before) -> \(.bytes_after) bytes, held-out (stories) ppl of the SFT model \(.eval.base_ppl * 1000 | round / 1000) -> \(.eval.quant_ppl * 1000 | round / 1000)"'
jq -r '.weight_map | keys[] | select(test("layers.1.mlp.(experts.0|gate|moe_statics)"))' "$OUT/merged-wint8/model.safetensors.index.json"

say "6. serve the quantized MoE over the OpenAI API"
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ernie-serve "$OUT/merged-wint8" --port "$PORT" -q > "$OUT/serve.json" 2> "$OUT/serve.log" &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is 3 + 4?"}], "max_tokens": 8, "temperature": 0}' \
  | jq -r '"What is 3 + 4? -> \(.choices[0].message.content | @json)  (\(.usage.completion_tokens) tokens)"'
kill -TERM "$SERVE_PID"; wait "$SERVE_PID" || true; trap - EXIT

echo
echo "moe demo done in $(( $(date +%s) - start ))s; everything is in $OUT/"
