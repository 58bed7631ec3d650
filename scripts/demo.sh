#!/usr/bin/env bash
# `make demo`: the toolkit end to end on what the repo ships, the way a user would drive it.
# tokenizer -> pack -> pretrain a tiny ERNIE from scratch -> LoRA SFT on arithmetic -> report -> DPO on
# preference pairs (correct vs wrong sums) -> merge -> serve -> quantize (wint8, fp8) with the perplexity cost.
# Everything lands in demo-out/ (or $DEMO_OUT). Rerunning starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${DEMO_OUT:-demo-out}
PT_STEPS=${PT_STEPS:-400}
SFT_STEPS=${SFT_STEPS:-300}
DPO_STEPS=${DPO_STEPS:-60}
rm -rf "$OUT" && mkdir -p "$OUT"
say() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

say "1. train the tokenizer from assets/corpus (deterministic: same bytes as assets/tokenizer)"
python scripts/build_tokenizer.py -o "$OUT/tokenizer"
cmp "$OUT/tokenizer/tokenizer.model" assets/tokenizer/tokenizer.model && echo "identical to the shipped tokenizer"

say "2. pack: the corpus for pretraining (one document per line), arithmetic chats for SFT"
cat assets/corpus/stories.txt assets/corpus/sentences.txt assets/corpus/dialogues.txt assets/corpus/numbers.txt \
  | python -c 'import json,sys; [print(json.dumps({"text": l.strip()})) for l in sys.stdin if l.strip()]' \
  | ernie-pack pretrain -q --tokenizer "$OUT/tokenizer" --seq-len 256 --split 98,2,0 -o "$OUT/data/pt" - \
  | python -c 'import json,sys; print("pretrain: %(documents)s docs, %(tokens)s tokens, %(sequences)s sequences, packing efficiency %(packing_efficiency).3f" % json.load(sys.stdin))'
ernie-pack sft -q --tokenizer "$OUT/tokenizer" --seq-len 256 -o "$OUT/data/sft" assets/sft/arithmetic.jsonl \
  | python -c 'import json,sys; print("sft: %(documents)s chats, %(tokens)s tokens, %(sequences)s sequences" % json.load(sys.stdin))'
ernie-pack inspect "$OUT/data/sft" 2>/dev/null | head -n 12 || true

say "3. pretrain a tiny ERNIE 4.5 from scratch ($PT_STEPS steps)"
ernie-train pretrain --data "$OUT/data/pt-train" --eval-data "$OUT/data/pt-valid" --init-config ernie-tiny \
  --tokenizer "$OUT/tokenizer" -o "$OUT/pretrain" --max-steps "$PT_STEPS" --save-steps "$PT_STEPS" \
  --eval-steps 100 --logging-steps 10 --learning-rate 3e-3 --min-lr 3e-4 --warmup-steps 20 \
  --per-device-train-batch-size 8 > "$OUT/pretrain.json"
BASE=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$OUT/pretrain.json")

say "4. LoRA SFT on arithmetic ($SFT_STEPS steps)"
ernie-train sft --data "$OUT/data/sft" --model "$BASE" --lora --lora-rank 16 -o "$OUT/sft" \
  --max-steps "$SFT_STEPS" --save-steps "$SFT_STEPS" --logging-steps 10 --learning-rate 2e-3 --warmup-steps 10 \
  --per-device-train-batch-size 8 > "$OUT/sft.json"
ADAPTER=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$OUT/sft.json")

say "5. report: loss curves, held-out arithmetic, a sample chat"
python scripts/demo_report.py --pretrain "$OUT/pretrain" --sft "$OUT/sft" --base "$BASE" --adapter "$ADAPTER" \
  --eval assets/sft/arithmetic-eval.jsonl --png "$OUT/loss.png"
say "6. DPO: prefer the correct sum over a wrong one (assets/dpo, made by scripts/make_preferences.py)"
ernie-merge --base "$BASE" --adapter "$ADAPTER" -o "$OUT/sft-model" -q > /dev/null   # the SFT model DPO starts from
ernie-pack dpo -q --tokenizer "$OUT/tokenizer" --seq-len 256 -o "$OUT/data/dpo" assets/dpo/arithmetic-pref.jsonl \
  | python -c 'import json,sys; print("dpo: %(documents)s pairs, %(tokens)s tokens, %(sequences)s sequences" % json.load(sys.stdin))'
ernie-pack dpo -q --tokenizer "$OUT/tokenizer" --seq-len 256 -o "$OUT/data/dpo-eval" assets/dpo/arithmetic-pref-eval.jsonl > /dev/null
ernie-train dpo-ref -q --data "$OUT/data/dpo" --model "$OUT/sft-model" \
  | python -c 'import json,sys; s=json.load(sys.stdin); print("reference log-probs of %(pairs)s pairs cached in %(output)s (%(seconds).1f s)" % s)'
# --sft-loss-ratio 1 keeps the chosen answers likely: plain DPO on this tiny model lowers both replies, its
# end-of-sentence token with them, and the served model then rambles (tools/ernie-train/README.md).
ernie-train dpo --data "$OUT/data/dpo" --model "$OUT/sft-model" --ref-logps "$OUT/data/dpo.ref-logps" --lora --lora-rank 16 \
  -o "$OUT/dpo" --max-steps "$DPO_STEPS" --save-steps "$DPO_STEPS" --logging-steps 5 --learning-rate 2e-3 --warmup-steps 5 \
  --per-device-train-batch-size 4 --beta 0.5 --sft-loss-ratio 1 > "$OUT/dpo.json"
DPO_ADAPTER=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$OUT/dpo.json")
python scripts/demo_dpo_report.py --sft "$OUT/sft-model" --adapter "$DPO_ADAPTER" --data "$OUT/data/dpo-eval" --run "$OUT/dpo" \
  --beta 0.5 --eval assets/sft/arithmetic-eval.jsonl

say "7. merge the DPO adapter into the SFT model, one tensor at a time, into FastDeploy's Paddle layout"
ernie-merge --base "$OUT/sft-model" --adapter "$DPO_ADAPTER" -o "$OUT/chat-model" --layout paddle --verify -q \
  | python -c 'import json,sys; s=json.load(sys.stdin); print("merged %s tensors, %s bytes, %.2f s; --verify max |logits diff| vs base+adapter: %.2e" % (s["tensors_merged"], s["bytes"], s["seconds"], s["verify"]["max_abs_diff"]))'

say "8. serve it over the OpenAI API and ask one question"
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ernie-serve "$OUT/chat-model" --port "$PORT" -q > "$OUT/serve.json" 2> "$OUT/serve.log" &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.2; done
echo 'POST /v1/chat/completions {"messages": [{"role": "user", "content": "What is 3 + 4?"}]}'
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is 3 + 4?"}], "max_tokens": 8, "temperature": 0}' \
  | python -c 'import json,sys; r=json.load(sys.stdin); print("Assistant:", repr(r["choices"][0]["message"]["content"]), "| usage", r["usage"])'
kill -TERM "$SERVE_PID"; wait "$SERVE_PID" || true; trap - EXIT

say "9. quantize the merged model (wint8 and fp8, FastDeploy layout) and measure the perplexity cost"
for method in wint8 fp8; do
  ernie-quant "$method" --model "$OUT/chat-model" -o "$OUT/chat-model-$method" --calib "$OUT/data/pt-train" \
    --eval "$OUT/data/pt-valid" -q \
    | python -c 'import json,sys; s=json.load(sys.stdin); e=s["eval"]; print("%-5s %7d -> %7d bytes  held-out ppl %.3f -> %.3f (%+.2f%%)  max layer error %.4f" % (s["method"], s["bytes_before"], s["bytes_after"], e["base_ppl"], e["quant_ppl"], e["ppl_delta_pct"], s["max_layer_error"]))'
done

echo
echo "demo done in $(( $(date +%s) - start ))s; everything is in $OUT/"
