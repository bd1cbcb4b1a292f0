"""The export: consolidated safetensors weights (ZeRO-3 gathered), tokenizer, label maps, resolved configs and
metrics in `<output_dir>/final`, written under a temporary name, verified, then swapped in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from llmkit import faults
from llmkit.errors import LlmkitError
from llmkit.model import check_export_weights, locate
from llmkit.rundir import life
from llmkit.rundir.layout import Export
from llmkit.ship import verify
from llmkit.ship.reload import canonical_names
from llmkit.train.run import Run

PROBE_TOKENS = 16  # per probe row of a causal-LM export check


def gather(run: Run, model) -> tuple[dict | None, object]:
    """Full weights on CPU (rank 0; None elsewhere) and the unwrapped model. Every rank must call it: under
    ZeRO-3 the gather is collective."""
    acc = run.accelerator
    state_dict = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None, None
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    verify.no_empty_tensors({k: tuple(v.shape) for k, v in state_dict.items()}, "the gathered weights")
    return state_dict, acc.unwrap_model(model)


def _gather_for_export(run: Run, model) -> tuple[dict | None, object]:
    if faults.ON:  # the signal tests: a SIGTERM arrives while the export is being written
        faults.hit("stall_export", 0, run.accelerator.process_index)
    return gather(run, model)


def _publish(run: Run, tmp: Path, results: dict) -> None:
    """Add the resolved configs and metrics to a verified export, then swap it in for `final` (rank 0)."""
    staged = Export(tmp)
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


def _fresh_tmp(run: Run) -> Path:
    tmp = run.dir.final_tmp
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def save_classifier(run: Run, model, tokenizer, results: dict, rows, predictions: dict[str, np.ndarray]) -> Path:
    """Write `<output_dir>/final` atomically; all ranks must call it (ZeRO-3 gathers weights collectively).

    `rows` and `predictions` are a split's rows and the run's predictions on them: the reloaded export must
    reproduce those logits (verify.check_classifier)."""
    acc = run.accelerator
    state_dict, unwrapped = _gather_for_export(run, model)
    final = run.dir.final.root
    if acc.is_main_process:
        missing = set(unwrapped.state_dict()) - set(state_dict)
        if missing:
            raise LlmkitError(f"the gathered weights lack {len(missing)} tensors (e.g. {sorted(missing)[0]})")
        tmp = _fresh_tmp(run)
        probe = verify.classifier_probe(rows, run.cfg.data, predictions, run.precision,
                                         run.cfg.model.trust_remote_code)
        if hasattr(unwrapped, "peft_config"):  # LoRA: the adapter with its head; the merged model is built from it
            _save_adapter(unwrapped, state_dict, tokenizer, Export(tmp).adapter)
            config = unwrapped.config
            head = {"num_labels": config.num_labels, "id2label": config.id2label, "label2id": config.label2id,
                    "pad_token_id": config.pad_token_id}
            probe.update(lora=True, base=locate(run.cfg.model.name_or_path, "model"), quantized=_quantized(run),
                         head=head)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, **canonical_names(unwrapped))
            tokenizer.save_pretrained(tmp)
        if probe.get("lora") or run.cfg.output.verify_export:
            run.log("export: reloading it with plain transformers in a fresh CPU process to check it"
                    + (" (and merging the adapter)" if probe.get("lora") else "") + "; the other ranks wait")
            try:  # for LoRA this writes the merged classifier into tmp first
                checked = verify.check_classifier(tmp, probe)
            except LlmkitError as exc:
                raise LlmkitError(f"{exc}; it stays in {tmp} for inspection") from None
        else:
            checked = _weights_only(tmp)
        Export(tmp).probe.write_text(json.dumps(probe) + "\n")
        _publish(run, tmp, {**results, "export_check": checked})
    acc.wait_for_everyone()
    return final


def _weights_only(tmp: Path) -> dict:
    """output.verify_export false: the written files are checked for empty tensors, not reloaded (the probe is
    still kept, so `llmkit push` reloads and compares before anything is uploaded)."""
    try:
        check_export_weights(tmp, "the export")
        verify.check_weights(tmp, action="export")
    except LlmkitError as exc:
        raise LlmkitError(f"{exc}; it stays in {tmp} for inspection") from None
    return {"reloaded": False, "why": "output.verify_export is false"}


def _quantized(run: Run) -> str | None:
    """QLoRA runs: the precision of the 4-bit base's compute dtype, for the reload check to build the same base."""
    return run.precision if run.cfg.lora.load_in_4bit else None


def _save_adapter(unwrapped, state_dict: dict, tokenizer, out: Path) -> None:
    """A peft model's adapter (and, for a classifier, its trained head) from the gathered weights, with the
    tokenizer; no tensor may be empty."""
    from safetensors.torch import load_file

    unwrapped.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    written = load_file(out / "adapter_model.safetensors")
    verify.no_empty_tensors({k: tuple(v.shape) for k, v in written.items()}, "the written LoRA adapter")


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

    The merge runs on CPU from the saved adapter and base files, never on ZeRO-3 partitions. The reloaded
    export must reproduce the run's own logits on a probe of `train_rows` (verify.check_causal_lm); the probe is
    kept in final/llmkit_probe.json so `llmkit push` can check again."""
    acc = run.accelerator
    ids, logits = probe_logits(run, model, train_rows)
    state_dict, unwrapped = _gather_for_export(run, model)
    final = run.dir.final.root
    if acc.is_main_process:
        tmp = _fresh_tmp(run)
        tmp.mkdir(parents=True)
        lora = hasattr(unwrapped, "peft_config")
        if lora:
            _save_adapter(unwrapped, state_dict, tokenizer, Export(tmp).adapter)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, **canonical_names(unwrapped))
            tokenizer.save_pretrained(tmp)
        base = locate(run.cfg.model.name_or_path, "model")
        probe = {"kind": "causal_lm", "precision": run.precision, "lora": lora, "base": base, "ids": ids,
                 "trust_remote_code": run.cfg.model.trust_remote_code, "quantized": _quantized(run),
                 "logits": np.asarray(logits, dtype=np.float64).tolist()}
        if lora or run.cfg.output.verify_export:
            run.log("export: reloading it with plain transformers in a fresh CPU process to check it"
                    + (" (and merging the adapter)" if lora else "") + "; the other ranks wait")
            try:  # for LoRA this also writes merged/
                checks = verify.check_causal_lm(Export(tmp).adapter if lora else tmp, probe,
                                                merged_out=Export(tmp).merged)
            except LlmkitError as exc:
                raise LlmkitError(f"{exc}; it stays in {tmp} for inspection") from None
        else:
            checks = _weights_only(tmp)
        Export(tmp).probe.write_text(json.dumps(probe) + "\n")
        _publish(run, tmp, {**results, "export_check": checks})
    acc.wait_for_everyone()
    return final
