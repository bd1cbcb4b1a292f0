"""The export: consolidated safetensors weights (ZeRO-3 gathered), tokenizer, label maps, resolved configs and
metrics in `<output_dir>/final`, written under a temporary name, verified, then swapped in.

Each export runs in three steps, in this order: this module writes the model (gathered weights, the LoRA adapter
or the full model, the tokenizer) into final.tmp; ship.verify checks it, once (verify.check_export: the probe,
no empty tensor, the reload); this module publishes it (records, probe, the swap)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from llmkit import faults
from llmkit.errors import LlmkitError
from llmkit.model import locate
from llmkit.rundir import life
from llmkit.rundir.layout import Export
from llmkit.ship import verify
from llmkit.ship.reload import canonical_names
from llmkit.train.run import Run

PROBE_TOKENS = 16  # per probe row of a causal-LM export check


def gather(run: Run, model) -> tuple[dict | None, object]:
    """Full weights on CPU (rank 0; None elsewhere) and the unwrapped model. Every rank must call it: under
    ZeRO-3 the gather is collective. The weights are not checked here: the export's one check
    (verify.check_export) and every_save's refuse size-0 tensors."""
    acc = run.accelerator
    state_dict = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None, None
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return state_dict, acc.unwrap_model(model)


def _gather_for_export(run: Run, model) -> tuple[dict | None, object]:
    if faults.ON:  # the signal tests: a SIGTERM arrives while the export is being written
        faults.hit("stall_export", 0, run.accelerator.process_index)
    return gather(run, model)


def _fresh_tmp(run: Run) -> Path:
    tmp = run.dir.final_tmp
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _write_model(unwrapped, state_dict: dict, tokenizer, tmp: Path) -> bool:
    """The model into `tmp` from the gathered weights, with its tokenizer: a peft model's adapter (with a
    classifier's trained head) in adapter/, else the full model at the root. True for an adapter. (transformers
    may empty `state_dict` as it writes the shards.)"""
    tmp.mkdir(parents=True)
    if hasattr(unwrapped, "peft_config"):
        out = Export(tmp).adapter
        unwrapped.save_pretrained(out, state_dict=state_dict)
        tokenizer.save_pretrained(out)
        return True
    unwrapped.save_pretrained(tmp, state_dict=state_dict, **canonical_names(unwrapped))
    tokenizer.save_pretrained(tmp)
    return False


def _quantized(run: Run) -> str | None:
    """QLoRA runs: the precision of the 4-bit base's compute dtype, for the reload check to build the same base."""
    return run.precision if run.cfg.lora.load_in_4bit else None


def kept_for_inspection(tmp: Path, check, *args):
    """`check(*args)`'s answer; when it refuses the export written in `tmp`, its error says the folder stays."""
    try:
        return check(*args)
    except LlmkitError as exc:
        raise LlmkitError(f"{exc}; it stays in {tmp} for inspection") from None


def _shapes(state_dict: dict) -> dict[str, tuple]:
    """The gathered weights' shapes, taken before they are written (for verify.check_export)."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _check_and_publish(run: Run, tmp: Path, gathered: dict[str, tuple], evidence: dict, results: dict) -> None:
    """The written export checked by ship.verify (once), then published with what the check found."""
    evidence = {**evidence, "precision": run.precision, "trust_remote_code": run.cfg.model.trust_remote_code}
    probe, checked = kept_for_inspection(tmp, verify.check_export, tmp, gathered, evidence,
                                         run.cfg.output.verify_export, run.log)
    _publish(run, tmp, probe, {**results, "export_check": checked})


def _publish(run: Run, tmp: Path, probe: dict, results: dict) -> None:
    """Add the probe, the resolved configs and metrics to a verified export, then swap it in for `final` (rank 0)."""
    staged = Export(tmp)
    staged.probe.write_text(json.dumps(probe) + "\n")
    run.cfg.save(staged.config)
    if run.ds_config:
        staged.ds_config.write_text(json.dumps(run.ds_config, indent=2) + "\n")
    staged.metrics.write_text(json.dumps(results, indent=2) + "\n")
    run.dir.metrics.write_text(json.dumps(results, indent=2) + "\n")
    # the old export is replaced only now that the new one is complete and verified
    final, old = run.dir.final.root, run.dir.final_old
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    life.drop_previous(run.dir)  # an overwritten run is gone only now


def save_classifier(run: Run, model, tokenizer, results: dict, rows, predictions: dict[str, np.ndarray]) -> Path:
    """Write `<output_dir>/final` atomically; all ranks must call it (ZeRO-3 gathers weights collectively).

    `rows` and `predictions` are a split's rows and the run's predictions on them: the reloaded export must
    reproduce those logits (verify.check_export). A LoRA run's merged classifier is written by that check."""
    acc = run.accelerator
    state_dict, unwrapped = _gather_for_export(run, model)
    if acc.is_main_process:
        missing = set(unwrapped.state_dict()) - set(state_dict)
        if missing:
            raise LlmkitError(f"the gathered weights lack {len(missing)} tensors (e.g. {sorted(missing)[0]})")
        tmp, gathered = _fresh_tmp(run), _shapes(state_dict)
        lora = _write_model(unwrapped, state_dict, tokenizer, tmp)
        evidence = {"kind": "classification", "lora": lora, "rows": rows, "data": run.cfg.data,
                    "predictions": predictions}
        if lora:  # the adapter's base, and the head the merged model must carry
            config = unwrapped.config
            evidence.update(base=locate(run.cfg.model.name_or_path, "model"), quantized=_quantized(run),
                            head={"num_labels": config.num_labels, "id2label": config.id2label,
                                  "label2id": config.label2id, "pad_token_id": config.pad_token_id})
        _check_and_publish(run, tmp, gathered, evidence, results)
    acc.wait_for_everyone()
    return run.dir.final.root


def probe_logits(run: Run, model, train_rows) -> tuple[list[list[int]], list]:
    """The first tokens of the first training rows (equal widths) and the run's own logits on them. Every rank
    calls it: under ZeRO-3 the forward is collective."""
    ids = [train_rows[i]["input_ids"][:PROBE_TOKENS] for i in range(min(2, len(train_rows)))]
    width = min(len(p) for p in ids)
    ids = [p[:width] for p in ids]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids, device=run.accelerator.device)).logits.float().cpu().tolist()
    return ids, logits


def save_causal_lm(run: Run, model, tokenizer, results: dict, train_rows) -> Path:
    """Write `<output_dir>/final` (full model, or `adapter/` + `merged/` for LoRA) atomically; all ranks call it.

    The merge runs on CPU from the saved adapter and base files, never on ZeRO-3 partitions (verify.check_export
    writes merged/). The reloaded export must reproduce the run's own logits on a probe of `train_rows`; the
    probe is kept in final/llmkit_probe.json so `llmkit push` can check again."""
    acc = run.accelerator
    ids, logits = probe_logits(run, model, train_rows)
    state_dict, unwrapped = _gather_for_export(run, model)
    if acc.is_main_process:
        tmp, gathered = _fresh_tmp(run), _shapes(state_dict)
        lora = _write_model(unwrapped, state_dict, tokenizer, tmp)
        evidence = {"kind": "causal_lm", "lora": lora, "ids": ids, "logits": logits,
                    "base": locate(run.cfg.model.name_or_path, "model"), "quantized": _quantized(run)}
        _check_and_publish(run, tmp, gathered, evidence, results)
    acc.wait_for_everyone()
    return run.dir.final.root
