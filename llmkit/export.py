"""Export: consolidated safetensors weights (ZeRO-3 gathered), tokenizer, label maps, metrics, verified by reload."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from llmkit.engine import Run
from llmkit.errors import LlmkitError

VERIFY_ROWS = 64


def write_predictions(path: Path, raw, out: dict[str, np.ndarray], label_names: list[str], text_column: str) -> None:
    """One JSON line per row: text, gold and predicted label, class probabilities."""
    probs = torch.softmax(torch.from_numpy(out["logits"]), dim=-1).numpy()
    order = np.argsort(out["row"])
    with open(path, "w") as fh:
        for i in order:
            row = int(out["row"][i])
            gold, pred = int(out["labels"][i]), int(out["logits"][i].argmax())
            fh.write(json.dumps({
                "row": row, "text": raw[row][text_column], "label": label_names[gold],
                "prediction": label_names[pred], "probabilities": [round(float(p), 6) for p in probs[i]],
            }, ensure_ascii=False) + "\n")


def _check_state_dict(state_dict: dict[str, torch.Tensor], model) -> None:
    empty = [k for k, v in state_dict.items() if v.numel() == 0]
    if empty:
        raise LlmkitError(f"the gathered weights have {len(empty)} empty tensors (e.g. {empty[0]}): ZeRO-3 weights "
                          "were not gathered. Nothing was exported.")
    expected = {k for k in model.state_dict()}
    missing = expected - set(state_dict)
    if missing:
        raise LlmkitError(f"the gathered weights lack {len(missing)} tensors (e.g. {sorted(missing)[0]})")


# Runs in a fresh interpreter: plain transformers, no llmkit import, no DeepSpeed state (under ZeRO-3 an
# in-process from_pretrained would try to partition the reloaded model across ranks).
_RELOAD = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, spec_path, out_path = sys.argv[1:4]
spec = json.load(open(spec_path))
tok = AutoTokenizer.from_pretrained(folder)
model, info = AutoModelForSequenceClassification.from_pretrained(folder, dtype="auto", output_loading_info=True)
with torch.no_grad():
    enc = tok(spec["texts"], spec["pairs"], padding=True, truncation=True, max_length=spec["max_length"],
              return_tensors="pt")
    logits = model.eval()(**enc).logits.float()
json.dump({"logits": logits.tolist(), "missing": sorted(info["missing_keys"]),
           "unexpected": sorted(info["unexpected_keys"])}, open(out_path, "w"))
"""


PROBE_FILE = "llmkit_probe.json"  # in final/: inputs and the run's own logits, to re-verify the export later


def classifier_probe(raw, data_cfg, out: dict[str, np.ndarray], precision: str) -> dict:
    """The first rows of a split (texts) and the run's logits on them."""
    n = min(VERIFY_ROWS, len(raw))
    rows = raw.select(range(n))
    where = {int(r): i for i, r in enumerate(out["row"])}
    return {"kind": "classification", "precision": precision, "texts": list(rows[data_cfg.text_column]),
            "pairs": list(rows[data_cfg.text_pair_column]) if data_cfg.text_pair_column else None,
            "max_length": data_cfg.max_length,
            "logits": np.stack([out["logits"][where[r]] for r in range(n)]).tolist()}


def check_classifier(folder: Path, probe: dict) -> dict:
    """Reload `folder` with plain transformers in a fresh process; its logits on the probe must be the run's."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, got_path = Path(tmp) / "spec.json", Path(tmp) / "got.json"
        spec_path.write_text(json.dumps(probe))
        proc = subprocess.run([sys.executable, "-c", _RELOAD, str(folder), str(spec_path), str(got_path)],
                              capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if proc.returncode != 0:
            raise LlmkitError(f"the export at {folder} does not reload with plain transformers:\n{proc.stderr[-2000:]}")
        reloaded = json.loads(got_path.read_text())
    if reloaded["missing"] or reloaded["unexpected"]:
        raise LlmkitError(f"the export at {folder} reloads with missing {reloaded['missing']} / unexpected "
                          f"{reloaded['unexpected']} weights")
    got, want = np.asarray(reloaded["logits"]), np.asarray(probe["logits"])
    tol = 1e-3 if probe["precision"] == "fp32" else 1e-1
    diff = float(np.abs(got - want).max())
    top2 = np.sort(want, -1)
    margin = top2[:, -1] - top2[:, -2]
    flips = int(((got.argmax(-1) != want.argmax(-1)) & (margin > 2 * tol)).sum())
    if diff > tol and flips:
        raise LlmkitError(f"the reloaded export disagrees with the run: max logit diff {diff:.3g}, "
                          f"{flips} changed predictions on {len(want)} rows. The export at {folder} is not "
                          "trustworthy.")
    return {"rows": len(want), "max_abs_logit_diff": diff,
            "same_predictions": int((got.argmax(-1) == want.argmax(-1)).sum())}


def _canonical_names(model) -> dict:
    """Save under the model's own parameter names. transformers 5 may otherwise map some back to legacy names
    (e.g. LayerNorm.gamma) depending on how the model was loaded, which differs under ZeRO-3."""
    params = inspect.signature(model.save_pretrained).parameters
    return {"save_original_format": False} if "save_original_format" in params else {}


def _gather(run: Run, model) -> tuple[dict | None, object]:
    """Full weights on CPU (rank 0; None elsewhere) and the unwrapped model. Every rank must call it: under
    ZeRO-3 the gather is collective."""
    acc = run.accelerator
    state_dict = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None, None
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, acc.unwrap_model(model)


def _publish(run: Run, tmp: Path, results: dict) -> None:
    """Add the resolved configs and metrics to a verified export, then swap it in for `final` (rank 0)."""
    run.cfg.save(tmp / "training_config.yaml")
    if run.ds_config:
        (tmp / "ds_config.json").write_text(json.dumps(run.ds_config, indent=2) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (run.output_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    # the old export is replaced only now that the new one is complete and verified
    final, old = run.output_dir / "final", run.output_dir / "final.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_final(run: Run, model, tokenizer, results: dict, check) -> Path:
    """Write `<output_dir>/final` atomically; all ranks must call it (ZeRO-3 gathers weights collectively).

    `check` is (raw split, the run's predictions on it) used to verify the reload.
    """
    acc = run.accelerator
    state_dict, unwrapped = _gather(run, model)
    final = run.output_dir / "final"
    if acc.is_main_process:
        _check_state_dict(state_dict, unwrapped)
        tmp = run.output_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, **_canonical_names(unwrapped))
        tokenizer.save_pretrained(tmp)
        probe = classifier_probe(check[0], run.cfg.data, check[1], run.precision)
        checked = check_classifier(tmp, probe)
        (tmp / PROBE_FILE).write_text(json.dumps(probe) + "\n")
        _publish(run, tmp, {**results, "export_check": checked})
    acc.wait_for_everyone()
    return final


# Fresh interpreter again: plain transformers + peft, no llmkit, no DeepSpeed state (under ZeRO-3 an
# in-process from_pretrained would partition the model across ranks and wait for them). For LoRA runs it
# loads base + adapter, merges on CPU from the saved files and saves the merged model; then it reloads the
# full (or merged) model and returns logits on fixed token ids.
_RELOAD_LM = """
import inspect, json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
spec = json.load(open(sys.argv[1]))
ids = torch.tensor(spec["ids"])
out = {}
if spec.get("adapter"):
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, spec["adapter"]).eval()
    with torch.no_grad():
        out["base_plus_adapter"] = peft(input_ids=ids).logits.tolist()
    merged = peft.merge_and_unload()
    kwargs = {"save_original_format": False} if "save_original_format" in inspect.signature(
        merged.save_pretrained).parameters else {}
    merged.save_pretrained(spec["model"], **kwargs)
    AutoTokenizer.from_pretrained(spec["adapter"]).save_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
AutoTokenizer.from_pretrained(spec["model"])
with torch.no_grad():
    out["model"] = model(input_ids=ids).logits.tolist()
    # the run computed in bf16/fp16: compare with the same arithmetic, so a small weight error cannot hide in noise
    out["model_in_run_dtype"] = model.to(getattr(torch, spec["dtype"]))(input_ids=ids).logits.float().tolist()
json.dump(out, open(sys.argv[2], "w"))
"""


def _run_fresh(script: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-c", script, str(spec_path), str(out_path)], capture_output=True,
                              text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if proc.returncode != 0:
            raise LlmkitError(f"the export does not reload with plain transformers/peft:\n{proc.stderr[-2000:]}")
        return json.loads(out_path.read_text())


def check_causal_lm(folder: Path, probe: dict, merged_out: Path | None = None) -> dict:
    """Reload a full model folder, or (probe["lora"]) an adapter folder on its base, with plain transformers / peft
    in a fresh process and compare its logits on the probe ids with the run's own. For an adapter the merged
    model is built from the saved files into `merged_out` (a throwaway folder when None) and checked too.

    Tolerance: 1e-4 of the logits' scale for fp32 runs; 5% relative norm, computed in the run's dtype, for
    bf16/fp16 ones (a bf16 LoRA run of SmolLM2, 30 layers, and its merged export differ by ~3% from rounding)."""
    with tempfile.TemporaryDirectory() as scratch:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(probe["precision"], "float32")
        spec = {"ids": probe["ids"], "dtype": dtype}
        if probe["lora"]:
            spec.update(model=str(merged_out or Path(scratch) / "merged"), base=probe["base"], adapter=str(folder))
        else:
            spec["model"] = str(folder)
        got = _run_fresh(_RELOAD_LM, spec)
    want = np.asarray(probe["logits"], dtype=np.float64)
    checks, bad = {}, {}

    def compare(name: str, a, b, tol: float, relative: bool = False) -> None:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if relative:
            diff = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
        else:  # absolute, on the scale of the logits (a real LM's reach ~30, a tiny test model's ~1)
            diff = float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))
        checks[name] = diff
        if diff > tol:
            bad[name] = (diff, tol)

    if probe["precision"] == "fp32":
        compare("model", got["model"], want, 1e-4)
    else:
        compare("model_relative", got["model_in_run_dtype"], want, 5e-2, relative=True)
    if probe["lora"]:
        compare("merged_vs_adapter", got["model"], got["base_plus_adapter"], 1e-4)
    if bad:
        raise LlmkitError(f"the reloaded export at {folder} disagrees with the run ((difference, tolerance): {bad})")
    return checks


def save_causal_lm(run: Run, model, tokenizer, results: dict, base: str, probe_ids: list[list[int]],
                   probe_logits) -> Path:
    """Write `<output_dir>/final` (full model, or `adapter/` + `merged/` for LoRA) atomically; all ranks call it.

    The merge runs on CPU from the saved adapter and base files, never on ZeRO-3 partitions.

    `probe_logits` are the run's own logits on `probe_ids`; the reloaded export must reproduce them (see
    check_causal_lm), and they are kept in final/llmkit_probe.json so `llmkit push` can check again."""
    acc = run.accelerator
    state_dict, unwrapped = _gather(run, model)
    final = run.output_dir / "final"
    if acc.is_main_process:
        empty = [k for k, v in state_dict.items() if v.numel() == 0]
        if empty:
            raise LlmkitError(f"the gathered weights have {len(empty)} empty tensors (e.g. {empty[0]}); nothing "
                              "was exported")
        tmp = run.output_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lora = hasattr(unwrapped, "peft_config")
        if lora:
            unwrapped.save_pretrained(tmp / "adapter", state_dict=state_dict)
            tokenizer.save_pretrained(tmp / "adapter")
            from safetensors.torch import load_file

            written = load_file(tmp / "adapter" / "adapter_model.safetensors")
            if not written or any(v.numel() == 0 for v in written.values()):
                raise LlmkitError("the LoRA adapter was written empty or with size-0 tensors; nothing was exported")
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, **_canonical_names(unwrapped))
            tokenizer.save_pretrained(tmp)
        probe = {"kind": "causal_lm", "precision": run.precision, "lora": lora, "base": base, "ids": probe_ids,
                 "logits": np.asarray(probe_logits, dtype=np.float64).tolist()}
        try:  # for LoRA this also writes merged/
            checks = check_causal_lm(tmp / "adapter" if lora else tmp, probe, merged_out=tmp / "merged")
        except LlmkitError as exc:
            raise LlmkitError(f"{exc}; it stays in {tmp} for inspection") from None
        (tmp / PROBE_FILE).write_text(json.dumps(probe) + "\n")
        _publish(run, tmp, {**results, "export_check": checks})
    acc.wait_for_everyone()
    return final
