"""This machine's GEMM peak (fp32, bf16) and the model FLOPs utilisation of finished llmkit runs.

Training FLOPs per real token = 6 x trained non-embedding parameters + 4 x frozen ones (a frozen weight needs the
forward and the input's gradient, not its own) + 12 x layers x hidden x mean sequence length (attention scores
and context, forward + backward; Kaplan et al. 2020 / PaLM appendix B) + a causal LM's output layer over the
vocabulary (6 or 4 x vocab x hidden: a GEMM as large as several layers on a small model). Recomputation under
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs). MFU = achieved model FLOP/s (real
tokens/s x FLOPs per token) / the measured GEMM peak of the precision the run used, with the same threads; and
against the GEMM rate at the model's own shapes (its linears and output layer at the run's micro-batch). Writes
bench/results/mfu.json.

    .venv/bin/python bench/mfu.py [outputs/sentiment_minilm_polarity ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from llmkit.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parents[1]


def gemm_peak(dtype: torch.dtype, threads: int, n: int = 1024, seconds: float = 3.0) -> float:
    """Sustained FLOP/s of an n x n x n matmul (median of timed batches after warm-up), on the GPU if any."""
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    if cuda:
        n = max(n, 8192)
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        rates.append(4 * 2 * n**3 / (time.perf_counter() - start))
    rates.sort()
    return rates[len(rates) // 2]


def gemm_at_shapes(config, tokens: int, dtype: torch.dtype, threads: int, vocab: int = 0) -> float:
    """FLOP/s the matmul kernels reach at this model's own linear-layer shapes (a micro-batch of `tokens` rows,
    forward plus the two backward products), single rank with `threads` threads: the ceiling MFU can reach
    when nothing but these GEMMs ran. Small hidden sizes run far below the square-matmul peak."""
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    h, ff = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    flops, seconds = 0.0, 0.0
    gated = config.model_type in ("llama", "qwen2", "mistral", "gemma", "gemma2", "phi3")  # up and gate
    shapes = [(h, h, 4), (h, ff, 1 + gated), (ff, h, 1)]  # q, k, v, out; FFN up; FFN down
    if vocab:  # a causal LM's output layer, once per (layers of) model: weighted by 1 / layers
        shapes.append((h, vocab, 1 / config.num_hidden_layers))
    for k, n, count in shapes:
        x, w, dy = (torch.randn(*shape, dtype=dtype, device=device) for shape in ((tokens, k), (k, n), (tokens, n)))
        products = ((x, w), (dy, w.t()), (x.t(), dy))  # forward, grad of the input, grad of the weight
        for a, b in products:
            for _ in range(3):
                a @ b
            times = []
            for _ in range(21):  # the median of 21: single products of a few ms are noisy on a shared CPU
                sync()
                start = time.perf_counter()
                a @ b
                sync()
                times.append(time.perf_counter() - start)
            seconds += sorted(times)[10] * count
            flops += 2 * a.shape[0] * a.shape[1] * b.shape[1] * count
    return flops / seconds


def flops_per_token(run_dir: Path) -> tuple[float, dict]:
    """Model FLOPs per real token (module docstring), from the run's model config, LoRA and mean sequence length."""
    from transformers import AutoConfig

    from llmkit.config import LoraConfig, ModelConfig
    from llmkit.model import locate, model_sizes
    from llmkit.rundir.layout import RunDir

    run = RunDir(run_dir)
    cfg = run.read_config()
    name = locate(cfg["model"]["name_or_path"], "model.name_or_path")
    config = AutoConfig.from_pretrained(name)
    causal = run.read_run_info().get("recipe") == "causal_lm"
    lora = LoraConfig(**{k: v for k, v in cfg.get("lora", {}).items() if k in ("enabled", "r", "target_modules")})
    sizes = model_sizes(ModelConfig(name_or_path=name), causal_lm=causal, lora=lora)
    h, vocab = config.hidden_size, config.vocab_size
    embed = vocab * h + getattr(config, "max_position_embeddings", 0) * h * \
        (config.model_type in ("bert", "distilbert", "roberta", "gpt2"))
    head_trained = causal and not lora.enabled  # a tied output layer trains with the embedding
    body = sizes.params - embed
    trained_body = sizes.trainable if lora.enabled else body  # LoRA: the adapters and heads; the embedding frozen
    summary = run.read_metrics()["train"]
    # mean real tokens per row of the processed batches (padding efficiency x padded width is not logged)
    seq = summary["real_tokens_per_second"] / max(summary.get("samples_per_second") or 1e-9, 1e-9)
    layers = config.num_hidden_layers
    per_token = 6 * trained_body + 4 * (body - trained_body) + 12 * layers * h * seq \
        + ((6 if head_trained else 4) * vocab * h if causal else 0)
    return per_token, {"params": sizes.params, "non_embedding": body, "trained_non_embedding": trained_body,
                       "causal_lm": causal, "layers": layers, "hidden": h, "mean_tokens_per_row": round(seq, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="finished llmkit run directories; RUN:PROFILED_RUN reads the step "
                    "breakdown from another run of the same settings made with --train.profile_steps")
    ap.add_argument("--out", type=Path, help="default: bench/results/mfu.json")
    ap.add_argument("--peak-seconds", type=float, default=3.0, help="how long each GEMM peak is timed")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    peaks = {}
    kinds = (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
    kinds = kinds if torch.cuda.is_available() else kinds[:2]
    if args.runs:  # fp32 and the precisions the runs used: a CPU without native bf16 takes seconds per bf16 product
        used = {"fp32"} | {RunDir(Path(spec.partition(":")[0])).read_metrics()["train"]["precision"]
                           for spec in args.runs}
        kinds = tuple(k for k in kinds if k[0] in used)
    for label, dtype in kinds:
        peaks[label] = {"all_cores": gemm_peak(dtype, cores, seconds=args.peak_seconds),
                        "one_core": gemm_peak(dtype, 1, seconds=args.peak_seconds)}
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cores} CPU cores"
    print(f"GEMM peak (square matmul, median), {where}:")
    for label, p in peaks.items():
        print(f"  {label}: {p['all_cores'] / 1e9:8.1f} GFLOP/s all cores, {p['one_core'] / 1e9:8.1f} GFLOP/s one core")
    result = {"cores": cores, "gemm_peak_flops": peaks, "runs": []}
    for spec in args.runs:
        run, _, profiled = spec.partition(":")
        run, profiled = Path(run), Path(profiled or run)
        summary = RunDir(run).read_metrics()["train"]
        per_token, facts = flops_per_token(run)
        achieved = summary["real_tokens_per_second"] * per_token
        world = summary.get("world_size", 1)
        # a 2-rank CPU run gives each rank cores/2 threads: its ceiling is the all-core peak
        peak = peaks[summary["precision"] if summary["precision"] in peaks else "fp32"]["all_cores"]
        mfu = achieved / peak
        # the GEMM ceiling at the run's own shapes: each rank's micro-batch, padded, with its share of the cores
        from transformers import AutoConfig

        from llmkit.model import locate

        cfg = RunDir(run).read_config()
        config = AutoConfig.from_pretrained(locate(cfg["model"]["name_or_path"], "model"))
        rows = cfg["train"]["per_device_batch_size"]
        tokens = int(rows * facts["mean_tokens_per_row"] / max(summary.get("padding_efficiency") or 1.0, 1e-9))
        dtype = dict(kinds)[summary["precision"] if summary["precision"] in peaks else "fp32"]
        ceiling = gemm_at_shapes(config, tokens, dtype, max(1, cores // world),
                                 config.vocab_size if facts["causal_lm"] else 0) * world
        phases = profiled / "profile" / "rank0_phases.json"  # written by the profiler (--train.profile_steps)
        result["runs"].append({"run": str(run), "precision": summary["precision"], "world_size": world,
                               "real_tokens_per_second": summary["real_tokens_per_second"],
                               "flops_per_token": per_token, "achieved_flops": achieved, "peak_flops": peak,
                               "mfu": mfu, "micro_batch_tokens": tokens, "gemm_at_shapes_flops": ceiling,
                               "gemm_at_shapes_fraction_of_peak": ceiling / peak,
                               "phases": json.loads(phases.read_text()) if phases.is_file() else None, **facts})
        print(f"{run}: {summary['precision']}, {world} rank(s), {summary['real_tokens_per_second']:.0f} real tok/s x "
              f"{per_token / 1e6:.1f} MFLOP/token = {achieved / 1e9:.1f} GFLOP/s = {mfu:.1%} of the "
              f"{summary['precision']} GEMM peak")
        print(f"  GEMMs at this model's shapes ({tokens} tokens per micro-batch, {max(1, cores // world)} thread(s) "
              f"per rank x {world}): {ceiling / 1e9:.1f} GFLOP/s = {ceiling / peak:.1%} of the peak; "
              f"the run reaches {achieved / ceiling:.1%} of that")
        if phases.is_file():
            ph = json.loads(phases.read_text())
            print("  profiled step (rank 0, ms): " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in ph.items()
                                                             if k.endswith("_ms")))
    out = args.out or ROOT / "bench" / "results" / "mfu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
