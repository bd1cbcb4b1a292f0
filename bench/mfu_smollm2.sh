#!/usr/bin/env bash
# MFU of SmolLM2-135M on this CPU (issue 23): full fine-tuning (packed text) and LoRA (label words), 1 process,
# the recipe's precision (bf16 where the CPU has it), gradient checkpointing off (model FLOPs, no recomputation).
# Each model trains twice: 20 steps for its throughput, then 8 steps with 3 profiled (after 3 warm-up) for the
# breakdown of a step; bench/mfu.py reads the first and the profile of the second. Skips a run already done.
#
#   bench/mfu_smollm2.sh [full lora lora_nodropout]     # the kinds to run (default: all three)
#   .venv/bin/python bench/mfu.py outputs/bench_mfu_smollm2_full:outputs/bench_mfu_smollm2_full_profile \
#       outputs/bench_mfu_smollm2_lora:outputs/bench_mfu_smollm2_lora_profile
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p outputs
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# this checkout's llmkit, not the one the virtualenv's editable install points at (a worktree of another commit)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
common=(--model.gradient_checkpointing false --train.logging_steps 10 --data.max_eval_samples 16
        --data.test_split null --train.sample_prompts null --output.explain_rows 0 --output.verify_export false
        --output.overwrite_output_dir true)
declare -A configs=([full]=smollm2_full_polarity_text.yaml [lora]=sentiment_smollm2_lora.yaml
                   [lora_nodropout]=sentiment_smollm2_lora.yaml)
declare -A extra=([full]="" [lora]="" [lora_nodropout]="--lora.dropout 0")  # without LoRA's dropout masks
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(full lora lora_nodropout)
for kind in "${kinds[@]}"; do
    [ -n "${configs[$kind]:-}" ] || { echo "unknown kind: $kind (full, lora, lora_nodropout)"; exit 2; }
    for phase in "" _profile; do
        out="outputs/bench_mfu_smollm2_${kind}${phase}"
        [ -f "$out/metrics.json" ] && { echo "done: $out"; continue; }
        steps=(--train.max_steps 20)
        [ -n "$phase" ] && steps=(--train.max_steps 8 --train.profile_steps 3)
        # shellcheck disable=SC2086
        .venv/bin/python recipes/causal_lm.py --config "recipes/configs/${configs[$kind]}" "${common[@]}" \
            "${steps[@]}" ${extra[$kind]} --output.output_dir "$out" > "$out.log" 2>&1 || { echo "failed: $out.log"; exit 1; }
        echo "$out: $(python3 -c "import json;t=json.load(open('$out/metrics.json'))['train'];print(t['real_tokens_per_second'],'real tok/s',t['precision'])")"
    done
done
