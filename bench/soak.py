"""Soak: a long 2-rank ZeRO-3 run of a tiny model with frequent checkpoints (keep_last 2), watched from outside.

Per rank: resident memory (RSS) and open file descriptors, sampled every second; the output dir's disk use.
Passes when, after warm-up (the first 10% of steps), RSS stays within 10% of its warm-up value, the fd count
does not grow, and disk use stays bounded by the checkpoints kept. Writes bench/results/soak.json.

    .venv/bin/python bench/soak.py [--steps 2000] [--save-every 100]      (or: make soak)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a movie film was is and very quite plot acting story great good fun bad awful boring dull".split()


def make_model_and_data(root: Path) -> tuple[Path, Path]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    model = root / "model"
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64, num_labels=2)).save_pretrained(model)
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 4000), ("validation", 64)):
        rows = []
        for i in range(n):
            words = rng.choices(WORDS[:12], k=rng.randint(3, 12)) + [("great" if i % 2 else "awful")]
            rows.append({"text": " ".join(words), "label": "pos" if i % 2 else "neg"})
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def _ranks(config: Path) -> dict[int, int]:
    """rank -> pid of the recipe processes of this run (found through /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if str(config).encode() not in cmd or b"accelerate.commands.launch" in b" ".join(cmd):
                continue
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
            if b"LOCAL_RANK" in env:
                found[int(env[b"RANK"])] = int(pid)
        except (OSError, ValueError):
            continue
    return found


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _disk_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.exists() else 0.0


def _step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--save-every", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmkit-soak-") as tmp:
        root = Path(tmp)
        model, data = make_model_and_data(root)
        out = root / "run"
        cfg = {"model": {"name_or_path": str(model)}, "data": {"dataset": str(data), "test_split": None,
                                                               "max_length": 32},
               "train": {"max_steps": args.steps, "per_device_batch_size": 4, "eval_batch_size": 32,
                         "learning_rate": 1e-3, "warmup_ratio": 0.0, "logging_steps": 10, "precision": "fp32",
                         "eval_every_steps": args.steps},
               "checkpoint": {"save_every_steps": args.save_every, "keep_last": 2},
               "output": {"output_dir": str(out)}}
        config = root / "soak.yaml"
        config.write_text(yaml.safe_dump(cfg))
        with socket.socket() as sock:  # a free rendezvous port: other 2-rank jobs may run on this machine
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs/cpu_zero3.yaml"), "--main_process_port", str(port),
               str(ROOT / "recipes/classification.py"), "--config", str(config)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(root / "soak.log", "w")
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        samples = []
        while proc.poll() is None:
            time.sleep(1.0)
            ranks = _ranks(config)
            if not ranks:
                continue
            samples.append({"t": round(time.time() - start, 1), "step": _step(out),
                            "rss_mib": {r: _rss_mib(p) for r, p in ranks.items()},
                            "fds": {r: _fds(p) for r, p in ranks.items()}, "disk_mib": _disk_mib(out)})
        wall = time.time() - start
        log.close()
        if proc.returncode != 0:
            print((root / "soak.log").read_text()[-5000:])
            raise SystemExit(f"the soak run failed with exit {proc.returncode}")
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    # the training phase after warm-up (the export, its reload check and the report come after the last step)
    warm = [s for s in samples if args.steps // 10 <= s["step"] < args.steps]
    result = {"steps": args.steps, "save_every": args.save_every, "wall_seconds": round(wall, 1),
              "checkpoints_left": checkpoints, "samples": len(samples), "ranks": {}}
    ok = True
    for rank in sorted({r for s in warm for r in s["rss_mib"]}):
        rss = [s["rss_mib"][rank] for s in warm if s["rss_mib"].get(rank)]
        fds = [s["fds"][rank] for s in warm if s["fds"].get(rank)]
        growth = (max(rss) - rss[0]) / rss[0]
        result["ranks"][rank] = {"rss_warm_mib": round(rss[0], 1), "rss_end_mib": round(rss[-1], 1),
                                 "rss_max_mib": round(max(rss), 1), "rss_growth": round(growth, 4),
                                 "fds_warm": fds[0], "fds_end": fds[-1], "fds_max": max(fds)}
        ok &= growth <= 0.10 and fds[-1] <= fds[0] + 2
    disk = [s["disk_mib"] for s in warm]
    result["disk_mib_max"] = round(max(disk), 2)
    result["disk_mib_end"] = round(disk[-1], 2)
    ok &= set(checkpoints) == {f"step-{args.steps - args.save_every}", f"step-{args.steps}"}  # keep_last 2
    result["passed"] = bool(ok)
    result["rss_mib_by_step"] = {s["step"]: s["rss_mib"] for s in warm[:: max(1, len(warm) // 20)]}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"soak: {args.steps} steps, checkpoint every {args.save_every}, {wall:.0f} s")
    print(f"{'rank':>4} {'RSS warm':>10} {'RSS end':>10} {'RSS max':>10} {'growth':>8} {'fds warm/end/max':>18}")
    for rank, r in result["ranks"].items():
        print(f"{rank:>4} {r['rss_warm_mib']:>9.1f}M {r['rss_end_mib']:>9.1f}M {r['rss_max_mib']:>9.1f}M "
              f"{r['rss_growth']:>8.2%} {r['fds_warm']:>6}/{r['fds_end']}/{r['fds_max']}")
    print(f"disk: max {result['disk_mib_max']:.1f} MiB, end {result['disk_mib_end']:.1f} MiB; "
          f"checkpoints left {checkpoints}; {'PASS' if ok else 'FAIL'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
