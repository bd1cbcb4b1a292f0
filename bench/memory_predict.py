"""Predicted vs measured peak memory per rank (issue 24): the "live at peak" the preflight logs for a run (named
"total at peak" before issue 46) against the peak each rank reports in metrics.json (train.per_rank.
peak_memory_bytes, held: RSS on CPU, reserved on a GPU; and since issue 46 live_peak_bytes, the live peak the
estimate predicts, recorded as measured_live_gib_per_rank), for short real runs of the shipped recipes on 2
ranks: the MiniLM classifier, SmolLM2 with LoRA (label words) and SmolLM2 full (packed text), ZeRO-2 and
ZeRO-3, with and without gradient checkpointing; and host memory at load (the table's "host at load") against
each rank's peak before the first step (train.per_rank.load_host_peak_bytes). Appends one JSON line per row to
bench/results/memory_predict.jsonl and skips rows already measured on this host with this allocator.

The estimate is at data.max_length, so the rows are made to reach it: each row of the bench's data is 8
consecutive polarity sentences joined (the first one's label), longer than every recipe's max_length.

Allocator: a GPU's max_memory_allocated counts live tensors, not what PyTorch's caching allocator keeps in
reserve. On a CPU, glibc's malloc keeps freed blocks of up to 32 MiB in its heap once it has freed one that size
(its dynamic mmap threshold), so RSS after the first step holds ~1 GiB no tensor uses. `--allocator live` (the
default) fixes the threshold (MALLOC_MMAP_THRESHOLD_=65536) so freed tensors go back to the system and RSS
follows live memory; `--allocator glibc` measures glibc's default, what a CPU run provisions unless it sets it.

    .venv/bin/python bench/memory_predict.py [--rows minilm_zero2 ...] [--steps 6] [--allocator live|glibc]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "memory_predict.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# name: (recipe, config, accelerate config, extra overrides)
ROWS = {
    "minilm_zero2": ("classification", "sentiment_minilm_polarity.yaml", "cpu_zero2.yaml", []),
    "minilm_zero3": ("classification", "sentiment_minilm_polarity.yaml", "cpu_zero3.yaml", []),
    "smollm2_lora_zero2": ("causal_lm", "sentiment_smollm2_lora.yaml", "cpu_zero2.yaml", []),
    "smollm2_lora_zero3": ("causal_lm", "sentiment_smollm2_lora.yaml", "cpu_zero3.yaml", []),
    "smollm2_lora_zero2_ckpt": ("causal_lm", "sentiment_smollm2_lora.yaml", "cpu_zero2.yaml",
                                ["--model.gradient_checkpointing", "true"]),
    "smollm2_full_zero2_ckpt": ("causal_lm", "smollm2_full_polarity_text.yaml", "cpu_zero2.yaml", []),
    "smollm2_full_zero2": ("causal_lm", "smollm2_full_polarity_text.yaml", "cpu_zero2.yaml",
                           ["--model.gradient_checkpointing", "false"]),
    # the case: a random ~0.3B Llama saved in bf16, ZeRO-3 from the checkpoint on disk, batch 4 x 256,
    # checkpointing; with zero.Init (the accelerate config's zero3_init_flag) and without
    "llama03b_zero3_ckpt": ("causal_lm", "smollm2_full_polarity_text.yaml", "cpu_zero3.yaml", ["LLAMA03B"]),
    "llama03b_zero3_noinit_ckpt": ("causal_lm", "smollm2_full_polarity_text.yaml",
                                   "cpu_zero3.yaml --zero3_init_flag false", ["LLAMA03B"]),
}
GIB = 2**30
ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc": {}}


def long_rows(out: Path, join: int = 8) -> Path:
    """The polarity asset's train and validation splits with `join` consecutive sentences per row."""
    from llmkit.model import locate

    src = Path(locate("asset:polarity", "data.dataset"))
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (src / f"{split}.jsonl").read_text().splitlines()]
        with open(out / f"{split}.jsonl", "w") as fh:
            for k in range(0, len(rows) - join + 1, join):
                text = " ".join(r["text"] for r in rows[k:k + join])
                fh.write(json.dumps({"text": text, "label": rows[k]["label"]}) + "\n")
    return out


def _host() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{socket.gethostname()} ({cpu}, {os.cpu_count()} cores)"


def llama_03b() -> Path:
    """A random-init Llama of ~0.3B parameters (hidden 1024, 16 layers, SmolLM2's 49k vocabulary and tokenizer),
    saved in bf16 once under ~/.cache/llmkit/bench."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.model import locate

    out = Path.home() / ".cache" / "llmkit" / "bench" / "llama03b"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer = Path(locate("asset:smollm2", "model.name_or_path"))
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return out


def measure(name: str, steps: int, allocator: str) -> dict:
    recipe, config, accelerate, extra = ROWS[name]
    if "LLAMA03B" in extra:
        extra = ["--model.name_or_path", str(llama_03b())]
    accelerate, *launch_flags = accelerate.split()
    with tempfile.TemporaryDirectory(prefix="llmkit-mem-") as tmp:
        data = long_rows(Path(tmp) / "data")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / accelerate), *launch_flags, "--main_process_port", "29641",
               str(ROOT / "recipes" / f"{recipe}.py"), "--config", str(ROOT / "recipes" / "configs" / config),
               "--output.output_dir", f"{tmp}/run", "--train.max_steps", str(steps), "--train.logging_steps", "1",
               "--train.eval_every_steps", str(steps), "--data.max_train_samples", "256",
               "--data.max_eval_samples", "32", "--data.test_split", "null", "--output.explain_rows", "0",
               "--output.verify_export", "false", "--data.dataset", str(data), *extra]
        if recipe == "causal_lm":
            cmd += ["--train.sample_prompts", "null"]
        proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, **ALLOCATORS[allocator]}, capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        said = proc.stdout + proc.stderr
        terms = {k: v for k, v in re.findall(r"^\s+([a-z][a-zA-Z0-9 ()-]+?)\s+(\d+\.\d+) GiB", said, re.M)}
        train = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["train"]
    measured = [b / GIB for b in train["per_rank"]["peak_memory_bytes"]]
    phases = {f"measured_{phase}_gib_per_rank": [round(b / GIB, 3) for b in train["per_rank"][key]]
              for phase, key in (("load", "load_host_peak_bytes"), ("train", "train_peak_bytes"))
              if key in train["per_rank"]}
    predicted = float(terms.get("live at peak") or terms["total at peak"])
    if any(b is not None for b in train["per_rank"].get("live_peak_bytes", [])):
        phases["measured_live_gib_per_rank"] = [None if b is None else round(b / GIB, 3)
                                                for b in train["per_rank"]["live_peak_bytes"]]
    return {"row": name, "host": _host(), "allocator": allocator, "data": "8 polarity sentences a row",
            "steps": steps, "precision": train["precision"],
            "zero_stage": train["zero_stage"], "predicted_gib": predicted,
            "terms_gib": {k: float(v) for k, v in terms.items()},
            "measured_gib_per_rank": [round(m, 3) for m in measured], **phases,
            "ratio_measured_to_predicted": round(max(measured) / predicted, 3),
            **({"predicted_load_gib": float(terms["host at load"]),
                "ratio_load_measured_to_predicted": round(max(phases["measured_load_gib_per_rank"])
                                                          / float(terms["host at load"]), 3)}
               if "host at load" in terms and phases else {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--again", action="store_true", help="measure rows already measured on this host (the estimate "
                    "changed); the newest row of a name is the one that counts")
    ap.add_argument("--allocator", choices=list(ALLOCATORS), default="live")
    args = ap.parse_args()
    done = set()
    if OUT.is_file() and not args.again:
        done = {(r["row"], r["host"], r.get("allocator")) for r in map(json.loads, OUT.read_text().splitlines())}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for name in args.rows:
        if (name, _host(), args.allocator) in done:
            print(f"{name}: already measured on this host")
            continue
        row = measure(name, args.steps, args.allocator)
        with open(OUT, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{name}: predicted {row['predicted_gib']:.2f} GiB, measured {max(row['measured_gib_per_rank']):.2f} "
              f"GiB per rank (x{row['ratio_measured_to_predicted']}); at load "
              f"x{row.get('ratio_load_measured_to_predicted')}", flush=True)


if __name__ == "__main__":
    main()
