"""The GPU numbers (issue 21), in one go on one lent GPU (about 8 minutes; such a machine has no network, so the
models start from random weights and the inputs travel along: `bash bench/gpu.sh --prepare` writes them):

  1. a ~1B Llama-shaped causal LM (18 layers, 2048 wide), ZeRO-2 on one GPU, in bf16 and in fp16 (SDPA
     attention), then bf16 with eager attention and, where flash-attn is installed, flash_attention_2: real tokens/s,
     MFU against the GEMM rate measured in the same run (bench/mfu.py), peak GPU memory, the fp16 loss scale's
     trajectory (train/loss_scale);
  2. an fp16 run made to overflow from step 5 on (LLMKIT_FAULT=overflow@5:0: the loss times 1e30, finite in
     fp32, infinite in every fp16 gradient): the loss-scale watchdog must stop it with its message, exit 2;
  3. the sequence classifier against HF Trainer (best configuration) and the hand-written Accelerate loop at
     equal work (bench/throughput.py): samples/s and llmkit's speed-up.

`--dry` runs the same path on a CPU with a tiny Llama and a few steps, fp16 parts skipped (fp16 needs a GPU):
`make test` runs it (tests/test_bench.py) and checks the table. Writes OUT/gpu.json and prints the table.

    python bench/gpu.py [--dry] [--out outputs/gpu] [--steps 40]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
INPUTS = Path(os.environ.get("GPU_INPUTS", BENCH / "results" / "gpu_inputs"))
WATCHDOG = "the fp16 loss scale has been at its minimum"
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18, "num_attention_heads": 16,
            "num_key_value_heads": 16, "max_position_embeddings": 2048}
LLAMA_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256}


def _inputs(dry: bool) -> tuple[Path, Path, Path]:
    """SmolLM2's and MiniLM's config and tokenizer folders and the polarity data: the prepared inputs, or (dry,
    or where they were not prepared) the installed assets."""
    if dry or not (INPUTS / "minilm" / "tokenizer.json").is_file():
        from llmkit import assets

        found = Path(assets.assets_dir())
        if (found / "minilm" / "tokenizer.json").is_file():
            return found / "smollm2", found / "minilm", found / "polarity"
        sys.exit(f"no inputs: `bash bench/gpu.sh --prepare` where the assets are installed, or set GPU_INPUTS "
                 f"(looked in {INPUTS} and {found})")
    return INPUTS / "smollm2", INPUTS / "minilm", INPUTS / "polarity"


def _model_config(out: Path, shape: dict, tokenizer: Path) -> Path:
    from transformers import LlamaConfig

    vocab = json.loads((tokenizer / "config.json").read_text())["vocab_size"]
    LlamaConfig(vocab_size=vocab, **shape).save_pretrained(out)
    return out


def _launch(name: str, out: Path, model: Path, tokenizer: Path, data: Path, precision: str, steps: int,
            batch: int, more: list[str] = (), env: dict | None = None) -> dict:
    """One causal-LM run of recipes/causal_lm.py on one process, ZeRO-2; its exit code and the error line."""
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / "zero2.yaml"),
           "--num_processes", "1", str(ROOT / "recipes" / "causal_lm.py"),
           "--config", str(ROOT / "recipes" / "configs" / "smollm2_full_polarity_text.yaml"),
           "--data.dataset", str(data), "--model.name_or_path", str(model), "--model.tokenizer", str(tokenizer),
           "--model.from_scratch", "true", "--train.precision", precision, "--train.max_steps", str(steps),
           "--train.logging_steps", "5", "--train.per_device_batch_size", str(batch), "--train.sample_prompts",
           "null", "--data.max_eval_samples", "32", "--output.output_dir", str(out / name),
           "--output.overwrite_output_dir", "true", *more]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    said = [line for line in proc.stderr.splitlines() if line.startswith("llmkit: error")]
    print(f"{name}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s" + (f": {said[-1]}" if said else ""),
          flush=True)
    if proc.returncode and not env:
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        sys.exit(f"{name} failed; see {out / f'{name}.log'}")
    return {"name": name, "exit": proc.returncode, "error": said[-1] if said else None}


def _run_numbers(run: Path) -> dict:
    train = json.loads((run / "metrics.json").read_text())["train"]
    scales = [json.loads(line).get("train/loss_scale") for line in (run / "metrics.jsonl").read_text().splitlines()]
    scales = [s for s in scales if s is not None]
    return {"tokens_per_second": train["real_tokens_per_second"], "peak_memory_gib": train["peak_memory_bytes"] / 2**30,
            "precision": train["precision"], "loss_scale": scales}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU: a tiny Llama, a few steps, the fp16 parts skipped")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.dry
    if not gpu and not args.dry:
        sys.exit("no GPU here: run with --dry for the CPU path")
    steps, batch = (3, 2) if args.dry else (args.steps, 8)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, minilm, data = _inputs(args.dry)
    model = _model_config(out / "model", LLAMA_TINY if args.dry else LLAMA_1B, tokenizer)
    from llmkit.launch.precision import resolve_precision

    half = "bf16" if gpu else resolve_precision("auto")[0]  # a CPU without native bf16 runs the dry path in fp32
    runs = [(f"llama_{half}_sdpa", half, ["--model.attn_implementation", "sdpa"]),
            (f"llama_{half}_eager", half, ["--model.attn_implementation", "eager"])]
    if gpu:
        runs.insert(1, ("llama_fp16_sdpa", "fp16", ["--model.attn_implementation", "sdpa"]))
        if importlib.util.find_spec("flash_attn"):
            runs.append(("llama_bf16_flash2", "bf16", ["--model.attn_implementation", "flash_attention_2"]))
    checkpointing = ["--model.gradient_checkpointing", "false" if args.dry else "true"]
    # the dry path checks the script, not the numbers: no fresh-process reload of each export, a slice of the rows
    dry = ["--output.verify_export", "false", "--data.max_train_samples", "256"] if args.dry else []
    for name, precision, more in runs:
        _launch(name, out, model, tokenizer, data, precision, steps, batch, more + checkpointing + dry)
    doc = {"device": torch.cuda.get_device_name() if gpu else "CPU (dry path)", "dry": args.dry, "runs": {}}
    if gpu:  # the watchdog: an fp16 run whose gradients overflow from step 5 on
        got = _launch("llama_fp16_overflow", out, model, tokenizer, data, "fp16", 60, batch,
                      ["--train.loss_scale_patience", "5"] + checkpointing, env={"LLMKIT_FAULT": "overflow@5:0"})
        doc["watchdog"] = {**got, "stopped_as_designed": got["exit"] == 2 and WATCHDOG in (got["error"] or "")}
    subprocess.run([PY, str(BENCH / "mfu.py"), *(str(out / n) for n, _, _ in runs), "--out", str(out / "mfu.json"),
                    "--peak-seconds", "0.5" if args.dry else "3"], check=True, cwd=ROOT, capture_output=True)
    mfu = {Path(r["run"]).name: r for r in json.loads((out / "mfu.json").read_text())["runs"]}
    for name, _, _ in runs:
        doc["runs"][name] = {**_run_numbers(out / name), "mfu": mfu[name]["mfu"],
                             "gemm_at_shapes_flops": mfu[name]["gemm_at_shapes_flops"]}
    rows, reps = (32, 1) if args.dry else (1024, 3)
    # random MiniLM-shaped weights for every runner (BENCH_MODEL): the weights do not travel to a GPU machine
    got = subprocess.run([PY, str(BENCH / "throughput.py"), "--rows", str(rows), "--reps", str(reps), "--only",
                          "llmkit", "trainer_best", "hand_loop", "--out", str(out / "throughput.json")], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "BENCH_MODEL": str(minilm)})
    if got.returncode:
        sys.exit(f"bench/throughput.py failed:\n{got.stderr[-3000:]}")
    doc["classifier"] = json.loads((out / "throughput.json").read_text())["table"]
    (out / "gpu.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))


def table(doc: dict) -> str:
    """The Markdown table for bench/README.md."""
    lines = [f"{doc['device']}", "", "| run | real tokens/s | MFU | peak memory | loss scale (first, min, last) |",
             "|---|---|---|---|---|"]
    for name, r in doc["runs"].items():
        scale = r["loss_scale"]
        shown = f"{scale[0]:g}, {min(scale):g}, {scale[-1]:g}" if scale else "-"
        lines.append(f"| {name} | {r['tokens_per_second']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_memory_gib']:.2f} GiB"
                     f" | {shown} |")
    if "watchdog" in doc:
        w = doc["watchdog"]
        lines.append(f"\nfp16 overflow from step 5: exit {w['exit']}, stopped by the watchdog: "
                     f"{'yes' if w['stopped_as_designed'] else 'NO'} ({w['error']})")
    else:
        lines.append("\nfp16 and its watchdog: not run (fp16 needs a GPU)")
    c = doc["classifier"]
    lines += ["", "| classifier runner | samples/s | llmkit speed-up (95% CI) |", "|---|---|---|"]
    lines += [f"| {n} | {r['samples_per_second']:.1f} | {r['llmkit_speedup']:.3f} ({r['speedup_ci95'][0]:.3f}-"
              f"{r['speedup_ci95'][1]:.3f}) |" for n, r in c.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
