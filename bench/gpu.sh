#!/usr/bin/env bash
# GPU benchmark for a lent GPU machine (one GPU): the SmolLM2-135M shape full and LoRA with ZeRO-2 in bf16 and
# fp16, and a ~1B Llama-shaped model (bf16), each 60 steps on the polarity text; then the GEMM peak and the MFU of
# every run (bench/mfu.py), tokens/s and peak GPU memory (every rank's) from each run's metrics.json.
#   bash bench/gpu.sh            (about 10 minutes on an H200)
# It needs no network (such a machine has none): it runs on the Python it finds (PYTHON, else .venv/bin/python,
# else python3), which must import llmkit and its dependencies, and reads SmolLM2's config and tokenizer and the
# polarity text from GPU_INPUTS (default bench/results/gpu_inputs, about 4 MiB: `bash bench/gpu.sh --prepare` writes
# it on a machine with the assets installed). The models start from random weights: throughput and memory do not
# depend on the values, and SmolLM2's 0.5 GiB of weights need not travel.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUTS=${GPU_INPUTS:-bench/results/gpu_inputs}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ "${1:-}" = "--prepare" ]; then
  "$PY" -m llmkit.cli assets >/dev/null
  ASSETS=$("$PY" -c "from llmkit import assets; print(assets.assets_dir())")
  rm -rf "$INPUTS" && mkdir -p "$INPUTS/smollm2" "$INPUTS/polarity"
  cp "$ASSETS"/smollm2/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$INPUTS/smollm2/"
  cp "$ASSETS"/polarity/*.jsonl "$INPUTS/polarity/"
  du -sh "$INPUTS" && exit 0
fi
missing=$("$PY" - <<'PY'
import importlib.util
need = ["llmkit", "torch", "transformers", "accelerate", "deepspeed", "datasets", "peft", "evaluate", "matplotlib"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "bench/gpu.sh: $PY cannot import: $missing (this machine has no network: bring them along)" >&2; exit 2
fi
if [ ! -f "$INPUTS/smollm2/config.json" ] || [ ! -f "$INPUTS/polarity/train.jsonl" ]; then
  echo "bench/gpu.sh: no inputs in $INPUTS: run \`bash bench/gpu.sh --prepare\` where the assets are installed" \
    "and bring that folder along (or set GPU_INPUTS)" >&2; exit 2
fi
OUT=outputs/gpu
rm -rf "$OUT" && mkdir -p "$OUT"
ACC="--config_file accelerate_configs/zero2.yaml --num_processes 1"
DATA="--data.dataset $INPUTS/polarity"
COMMON="--train.max_steps 60 --train.logging_steps 20 --data.max_eval_samples 64 --output.overwrite_output_dir true"
for precision in bf16 fp16; do
  for lora in false true; do
    name="smollm2_$([ "$lora" = true ] && echo lora || echo full)_$precision"
    "$PY" -m accelerate.commands.launch $ACC recipes/causal_lm.py \
      --config recipes/configs/smollm2_full_polarity_text.yaml $DATA \
      --model.name_or_path "$INPUTS/smollm2" --model.from_scratch true \
      --train.precision "$precision" --lora.enabled "$lora" --train.per_device_batch_size 16 \
      --model.gradient_checkpointing false $COMMON --output.output_dir "$OUT/$name"
  done
done
# ~1B parameters, Llama-shaped, random init, byte-level BPE tokenizer trained on the data
mkdir -p "$OUT/llama1b_config"
"$PY" - "$OUT/llama1b_config" <<'PY'
import sys
from transformers import LlamaConfig
LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=2048).save_pretrained(sys.argv[1])
PY
"$PY" -m accelerate.commands.launch $ACC recipes/causal_lm.py \
  --config recipes/configs/smollm2_full_polarity_text.yaml $DATA --model.name_or_path "$OUT/llama1b_config" --model.from_scratch true --train.learning_rate 3e-4 \
  --train.precision bf16 --train.per_device_batch_size 8 --model.gradient_checkpointing true $COMMON \
  --train.sample_prompts null --output.output_dir "$OUT/llama1b_scratch_bf16"
"$PY" bench/mfu.py "$OUT"/smollm2_* "$OUT"/llama1b_scratch_bf16
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    s = json.loads(run.read_text())["train"]
    print(f"{run.parent.name:<28} {s['real_tokens_per_second']:>10.0f} tok/s  "
          f"peak {s['peak_memory_bytes'] / 2**30:6.2f} GiB (ranks: "
          f"{[round(b / 2**30, 2) for b in s['per_rank']['peak_memory_bytes']]})  {s['train_seconds']:>7.1f} s")
PY
