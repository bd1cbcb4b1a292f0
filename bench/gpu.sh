#!/usr/bin/env bash
# GPU benchmark for a lent GPU machine (one GPU): checks that this machine's Python has what llmkit needs and that
# the inputs came along, then runs bench/gpu.py (a ~1B Llama in bf16 and fp16, SDPA / eager / flash attention, the
# fp16 watchdog on a run made to overflow, the classifier against Trainer and the hand loop; see its docstring).
#   bash bench/gpu.sh            (about 8 minutes on an H100)
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
  rm -rf "$INPUTS" && mkdir -p "$INPUTS/smollm2" "$INPUTS/minilm" "$INPUTS/polarity"
  cp "$ASSETS"/smollm2/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$INPUTS/smollm2/"
  cp "$ASSETS"/minilm/{config.json,tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} \
    "$INPUTS/minilm/"
  cp "$ASSETS"/polarity/*.jsonl "$INPUTS/polarity/"
  du -sh "$INPUTS" && exit 0
fi
missing=$("$PY" - <<'PY'
import importlib.util
need = ["llmkit", "torch", "transformers", "accelerate", "deepspeed", "datasets", "peft", "evaluate", "matplotlib",
        "scipy", "sklearn"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "bench/gpu.sh: $PY cannot import: $missing (this machine has no network: bring them along)" >&2; exit 2
fi
if [ ! -f "$INPUTS/smollm2/config.json" ] || [ ! -f "$INPUTS/minilm/config.json" ] || \
   [ ! -f "$INPUTS/polarity/train.jsonl" ]; then
  echo "bench/gpu.sh: no inputs in $INPUTS: run \`bash bench/gpu.sh --prepare\` where the assets are installed" \
    "and bring that folder along (or set GPU_INPUTS)" >&2; exit 2
fi
GPU_INPUTS="$INPUTS" exec "$PY" bench/gpu.py "$@"
