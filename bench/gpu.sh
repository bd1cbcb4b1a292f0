#!/usr/bin/env bash
# GPU benchmark, ready for a lent H200 (one GPU): SmolLM2-135M full fine-tune and LoRA with ZeRO-2 in bf16 and
# fp16, and a ~1B Llama-shaped model built from scratch (bf16), each 60 steps on the polarity text; then the
# GEMM peak and the MFU of every run (bench/mfu.py), tokens/s and peak GPU memory from each run's metrics.json.
#   bash bench/gpu.sh            (about 10 minutes on an H200, set-up included)
set -euo pipefail
cd "$(dirname "$0")/.."
make setup assets >/dev/null
BIN=.venv/bin
OUT=outputs/gpu
rm -rf "$OUT" && mkdir -p "$OUT"
ACC="--config_file accelerate_configs/zero2.yaml --num_processes 1"
COMMON="--train.max_steps 60 --train.logging_steps 20 --data.max_eval_samples 64 --output.overwrite_output_dir true"
for precision in bf16 fp16; do
  for lora in false true; do
    name="smollm2_$([ "$lora" = true ] && echo lora || echo full)_$precision"
    $BIN/accelerate launch $ACC recipes/causal_lm.py --config recipes/configs/smollm2_full_polarity_text.yaml \
      --train.precision "$precision" --lora.enabled "$lora" --train.per_device_batch_size 16 \
      --model.gradient_checkpointing false $COMMON --output.output_dir "$OUT/$name"
  done
done
# ~1B parameters, Llama-shaped, random init, byte-level BPE tokenizer trained on the data
mkdir -p "$OUT/llama1b_config"
$BIN/python - "$OUT/llama1b_config" <<'PY'
import sys
from transformers import LlamaConfig
LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=2048).save_pretrained(sys.argv[1])
PY
$BIN/accelerate launch $ACC recipes/causal_lm.py --config recipes/configs/smollm2_full_polarity_text.yaml \
  --model.name_or_path "$OUT/llama1b_config" --model.from_scratch true --train.learning_rate 3e-4 \
  --train.precision bf16 --train.per_device_batch_size 8 --model.gradient_checkpointing true $COMMON \
  --train.sample_prompts null --output.output_dir "$OUT/llama1b_scratch_bf16"
$BIN/python bench/mfu.py "$OUT"/smollm2_* "$OUT"/llama1b_scratch_bf16
$BIN/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    s = json.loads(run.read_text())["train"]
    print(f"{run.parent.name:<28} {s['real_tokens_per_second']:>10.0f} tok/s  "
          f"peak {s['peak_memory_bytes'] / 2**30:6.2f} GiB  {s['train_seconds']:>7.1f} s")
PY
