"""output.hub_strategy every_save: after each checkpoint the model's weights (not the optimizer, not the
DeepSpeed shards) go to the repo root, overwriting the previous ones, one commit per save, uploaded in the
background while training goes on. The repo then always holds the latest weights in the form plain transformers
loads; the end-of-run push replaces them with the verified export."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from llmkit import assets
from llmkit.rundir.layout import ADAPTER_CONFIG
from llmkit.ship import export, hub, verify
from llmkit.ship.reload import canonical_names


class WeightsUploader:
    """The training loop's after-save callback, on every rank (under ZeRO-3 the weights are gathered
    collectively); rank 0 writes the snapshot and uploads it."""

    def __init__(self, run, tokenizer):
        o = run.cfg.output
        self.run, self.tokenizer = run, tokenizer
        self.repo_id, self.private, self.revision = o.hub_model_id, o.hub_private, o.hub_revision
        self.root = run.dir.hub_snapshots  # removed once the uploads are done
        self.main = run.accelerator.is_main_process
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload") if self.main else None
        self.pending: list[tuple[str, Future]] = []

    def __call__(self, model, checkpoint: Path) -> None:
        state_dict, unwrapped = export.gather(self.run, model)
        if not self.main:
            return
        verify.no_empty_tensors({k: tuple(v.shape) for k, v in state_dict.items()}, "the gathered weights")
        snapshot = self.root / checkpoint.name
        shutil.rmtree(snapshot, ignore_errors=True)
        self._write(snapshot, unwrapped, state_dict)
        # a save whose upload has not started yet is superseded by this one: the repo wants the newest weights
        for name, future in self.pending:
            if future.cancel():
                self.run.log(f"hub: the upload of {name} had not started; {checkpoint.name} goes up instead")
                shutil.rmtree(self.root / name, ignore_errors=True)
        self.pending = [(n, f) for n, f in self.pending if not f.cancelled()]

        def job() -> str:
            try:
                return hub.upload(snapshot, self.repo_id, self.private, self.revision,
                                  f"llmkit: training in progress, {checkpoint.name}", log=self.run.log)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)

        self.pending.append((checkpoint.name, self.pool.submit(job)))

    def _write(self, out: Path, unwrapped, state_dict: dict) -> None:
        """The weights in the export's form (a LoRA run: the adapter, its base named by Hub id), the tokenizer,
        and no local path."""
        unwrapped.save_pretrained(out, state_dict=state_dict, **canonical_names(unwrapped))
        self.tokenizer.save_pretrained(out)
        adapter = out / ADAPTER_CONFIG
        if adapter.is_file():
            config = json.loads(adapter.read_text())
            base = assets.hub_id(self.run.cfg.model.name_or_path)
            if base:
                config["base_model_name_or_path"] = base
                adapter.write_text(json.dumps(config, indent=2) + "\n")
        verify.check_weights(out)
        hub.scrub_local_paths(out, hub.local_paths(self.run.dir, self.run.cfg.to_dict(), None))

    def wait(self) -> list[str]:
        """Block until every upload finished; return the error messages (uploads do not stop training)."""
        errors = []
        for name, future in self.pending:
            try:
                future.result()
                self.run.log(f"hub: uploaded the weights of {name}")
            except Exception as exc:  # reported, not raised: the final push still happens
                errors.append(f"{name}: {exc}")
        if self.pool is not None:
            self.pool.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)
        return errors


def uploader(run, tokenizer) -> WeightsUploader | None:
    """The after-save callback of a run with output.hub_strategy every_save (on every rank), else None."""
    o = run.cfg.output
    return WeightsUploader(run, tokenizer) if o.push_to_hub and o.hub_strategy == "every_save" else None
