"""Checks that an export is what the run trained: no empty tensors, and the weights reloaded with plain
transformers / peft in a fresh interpreter reproduce the run's own logits on a probe kept in final/. An export
being written is checked by one call, check_export; `llmkit push` checks its staged folder with the same pieces."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from llmkit import fresh
from llmkit.errors import LlmkitError
from llmkit.exported import opened
from llmkit.model import check_export_weights
from llmkit.rundir.layout import MERGED, Export

VERIFY_ROWS = 64


def no_empty_tensors(shapes: dict[str, tuple], where: str, action: str = "export") -> None:
    """There are tensors and none has size 0 (the ZeRO-3 failure: weights saved as empty shards)."""
    empty = [name for name, shape in shapes.items() if 0 in tuple(shape)]
    if not shapes or empty:
        what = f"{len(empty)} size-0 tensors (e.g. {empty[0]})" if shapes else "no tensors"
        raise LlmkitError(f"{where} has {what}; refusing to {action} a partial model")


def check_weights(folder: Path, action: str = "push") -> None:
    """Every safetensors file under `folder` holds tensors, none of size 0."""
    from safetensors import safe_open

    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        raise LlmkitError(f"{folder} holds no .safetensors weights; nothing to {action}")
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        no_empty_tensors(shapes, str(path.relative_to(folder)), action=action)


def check_export(folder: Path, gathered: dict[str, tuple], evidence: dict, reload: bool,
                 log=print) -> tuple[dict, dict]:
    """The one check of an export written into `folder` (ship.export calls it once, between writing and
    publishing): the gathered weights (`gathered`: their shapes) and a LoRA run's written adapter hold no size-0
    tensor; the probe is built from `evidence`; then the folder is reloaded in a fresh process and must reproduce
    the run's logits (`reload`, and always for a LoRA run, whose merged model that reload writes), else its files
    are checked whole and without empty tensors (weights_only). Returns (the probe, the check's record for
    metrics.json "export_check").

    `evidence`: "kind" (classification | causal_lm), "lora" (bool), "precision", "trust_remote_code"; a
    classifier's "rows", "data" (the data config) and "predictions" (the run's on those rows), with a LoRA run's
    "base", "quantized" and "head"; a causal LM's "ids" and "logits" (the run's own), "base" and "quantized"."""
    no_empty_tensors(gathered, "the gathered weights")
    lora = evidence["lora"]
    if lora:
        _adapter_tensors(Export(folder).adapter)
    probe = _probe(evidence)
    if not (lora or reload):
        return probe, weights_only(folder)
    log("export: reloading it with plain transformers in a fresh CPU process to check it"
        + (" (and merging the adapter)" if lora else "") + "; the other ranks wait")
    if probe["kind"] == "classification":  # for LoRA this writes the merged classifier into `folder` first
        return probe, check_classifier(folder, probe)
    return probe, check_causal_lm(Export(folder).adapter if lora else folder, probe,
                                  merged_out=Export(folder).merged)  # for LoRA this also writes merged/


def _adapter_tensors(adapter: Path) -> None:
    """The LoRA adapter as written (and, for a classifier, its trained head): no tensor may be empty."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    no_empty_tensors(shapes, "the written LoRA adapter")


def _probe(evidence: dict) -> dict:
    """The inputs and the run's own logits on them, kept in final/ (llmkit_probe.json) to check the export again
    at `llmkit push`."""
    e = evidence
    if e["kind"] == "classification":
        probe = classifier_probe(e["rows"], e["data"], e["predictions"], e["precision"], e["trust_remote_code"])
        if e["lora"]:
            probe.update(lora=True, base=e["base"], quantized=e["quantized"], head=e["head"])
        return probe
    return {"kind": "causal_lm", "precision": e["precision"], "lora": e["lora"], "base": e["base"], "ids": e["ids"],
            "trust_remote_code": e["trust_remote_code"], "quantized": e["quantized"],
            "logits": np.asarray(e["logits"], dtype=np.float64).tolist()}


def weights_only(folder: Path) -> dict:
    """output.verify_export false: the written files are checked for cut files and empty tensors, not reloaded
    (the probe is still kept, so `llmkit push` reloads and compares before anything is uploaded)."""
    check_export_weights(folder, "the export")
    check_weights(folder, action="export")
    return {"reloaded": False, "why": "output.verify_export is false"}


QUANTIZED_MERGE_TOL = 0.5  # relative logit difference allowed between a QLoRA run and its full-precision merge


def _run_fresh(kind: str, spec: dict, folder: Path) -> dict:
    """The export reloaded by plain transformers / peft in a fresh CPU-only interpreter (ship.reload); its answer."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = fresh.run_python(["-m", "llmkit.ship.reload", kind, str(spec_path), str(out_path)], cwd=tmp)
        if proc.returncode != 0:
            raise LlmkitError(f"the export at {folder} does not reload with plain transformers/peft:\n"
                              f"{proc.stderr[-2000:]}")
        return json.loads(out_path.read_text())


def classifier_probe(rows, data_cfg, out: dict[str, np.ndarray], precision: str, trust_remote_code: bool) -> dict:
    """The first rows of a split (texts) and the run's logits on them."""
    n = min(VERIFY_ROWS, len(rows))
    first = rows.select(range(n))
    where = {int(r): i for i, r in enumerate(out["row"])}
    return {"kind": "classification", "precision": precision, "trust_remote_code": trust_remote_code,
            "texts": list(first[data_cfg.text_column]),
            "pairs": list(first[data_cfg.text_pair_column]) if data_cfg.text_pair_column else None,
            "max_length": data_cfg.max_length,
            "logits": np.stack([out["logits"][where[r]] for r in range(n)]).tolist()}


def check_classifier(folder: Path, probe: dict) -> dict:
    """Reload `folder` with plain transformers in a fresh process; its logits on the probe must be the run's.
    A LoRA run (probe["lora"]): `folder`/adapter on its base too, which first writes the merged classifier into
    `folder` when that holds none; both must give the run's logits (a head re-initialised on reload would not)."""
    folder = fresh.absolute(folder)  # the fresh process runs elsewhere
    spec = {**probe, "folder": str(folder)}
    if probe.get("lora"):
        spec.update(adapter=str(Export(folder).adapter), merge=not opened.holds_model(folder))
    reloaded = _run_fresh("classifier", spec, folder)
    if reloaded["missing"] or reloaded["unexpected"]:
        raise LlmkitError(f"the export at {folder} reloads with missing {reloaded['missing']} / unexpected "
                          f"{reloaded['unexpected']} weights")
    quantized = bool(probe.get("quantized"))
    result = _compare_logits(folder, reloaded["logits"], probe, tol=QUANTIZED_MERGE_TOL if quantized else None)
    if probe.get("lora"):
        result["adapter"] = _compare_logits(Export(folder).adapter, reloaded["adapter_logits"], probe)
    if quantized:
        result["merged_from_full_precision_base"] = True
    return result


def _compare_logits(folder: Path, logits, probe: dict, tol: float | None = None) -> dict:
    got, want = np.asarray(logits), np.asarray(probe["logits"])
    tol = tol or (1e-3 if probe["precision"] == "fp32" else 1e-1)
    diff = float(np.abs(got - want).max())
    top2 = np.sort(want, -1)
    margin = top2[:, -1] - top2[:, -2]
    flips = int(((got.argmax(-1) != want.argmax(-1)) & (margin > 2 * tol)).sum())
    if diff > tol and flips:
        raise LlmkitError(f"the reloaded export disagrees with the run: max logit diff {diff:.3g}, "
                          f"{flips} changed predictions on {len(want)} rows. The export at {folder} is not "
                          "trustworthy.")
    # near ties: rows whose run margin is within the run's rounding, where a reload may pick the other label
    return {"rows": len(want), "max_abs_logit_diff": diff,
            "same_predictions": int((got.argmax(-1) == want.argmax(-1)).sum()),
            "near_ties": int((margin <= 2 * tol).sum())}


def check_causal_lm(folder: Path, probe: dict, merged_out: Path | None = None) -> dict:
    """Reload a full model folder, or (probe["lora"]) an adapter folder on its base, with plain transformers / peft
    in a fresh process and compare its logits on the probe ids with the run's own. For an adapter the merged
    model is built from the saved files into `merged_out` (a throwaway folder when None) and checked too.

    Tolerance: 1e-4 of the logits' scale for fp32 runs. For bf16/fp16 ones, the relative norm computed in the
    run's dtype, within 4x the reload's own rounding error (its logits in that dtype against fp32) and at least 5%:
    a SmolLM2 label-word LoRA run (30 layers, 120 bf16 steps) measured 6.0% with a rounding error of 1.8%, where
    its untrained base is 20% away."""
    folder = fresh.absolute(folder)  # the fresh process runs elsewhere
    merged_out = fresh.absolute(merged_out) if merged_out is not None else None
    with tempfile.TemporaryDirectory() as scratch:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(probe["precision"], "float32")
        spec = {"ids": probe["ids"], "dtype": dtype, "trust_remote_code": probe.get("trust_remote_code", False),
                "quantized": probe.get("quantized")}
        if probe["lora"]:
            spec.update(model=str(merged_out or Path(scratch) / MERGED), base=probe["base"], adapter=str(folder))
        else:
            spec["model"] = str(folder)
        got = _run_fresh("causal_lm", spec, folder)
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

    if probe.get("quantized"):
        # QLoRA: the adapter on the same 4-bit base must give the run's logits; the merged model (full-precision
        # base + adapter) differs by the quantization error, which is reported and bounded
        compare("adapter_on_4bit_base", got["base_plus_adapter"], want, 5e-2, relative=True)
        compare("merged_relative", got["model"], want, QUANTIZED_MERGE_TOL, relative=True)
    elif probe["precision"] == "fp32":
        compare("model", got["model"], want, 1e-4)
    else:
        # the run's rounding is of the order of this reload's own bf16/fp16 error: allow 4x it, at least 5%
        own = np.asarray(got["in_run_dtype"], dtype=np.float64) - np.asarray(got["model"], dtype=np.float64)
        noise = float(np.linalg.norm(own) / max(np.linalg.norm(np.asarray(got["model"])), 1e-12))
        checks["reload_rounding"] = noise
        compare("model_relative", got["in_run_dtype"], want, max(5e-2, 4 * noise), relative=True)
    if probe["lora"] and not probe.get("quantized"):
        compare("merged_vs_adapter", got["model"], got["base_plus_adapter"], 1e-4)
    if bad:
        raise LlmkitError(f"the reloaded export at {folder} disagrees with the run ((difference, tolerance): {bad})")
    return checks
