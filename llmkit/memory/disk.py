"""Disk a run needs under output_dir: the checkpoints it keeps (one more while the next is written) and the
export. The preflight checks it against the free space."""

from __future__ import annotations

from llmkit.config import Config
from llmkit.model import Sizes


def checkpoint_bytes(params: int, precision: str, trainable: int) -> int:
    """Rough size of one checkpoint on disk: the weights plus, for the trained parameters, fp32 master weights
    and two Adam moments (DeepSpeed's ZeRO saves its fp32 partitions in fp32 too: 12 bytes a trained weight in
    the optimizer files, tests/test_train_checkpoint.py; stage 0 in fp32 saves 8, counted as 12 here)."""
    weight = 4 if precision == "fp32" else 2
    optimizer = 12
    return int(params * weight + trainable * optimizer)


def disk_bytes(cfg: Config, sizes: Sizes, precision: str, conversion: int = 0) -> tuple[int, int]:
    """(one checkpoint, all the run needs) in bytes: the checkpoints kept plus the one being written, the export
    (fp32 weights, and a merged copy under LoRA), and `conversion` bytes (the universal copy an elastic resume
    writes beside its checkpoint)."""
    one = checkpoint_bytes(sizes.params, precision, sizes.trainable)
    keep = cfg.checkpoint.keep_last or 1
    saving = cfg.checkpoint.save_every_steps or cfg.checkpoint.save_every_epoch or cfg.checkpoint.resume_from
    need = (keep + 1) * one * bool(saving) + sizes.params * 4 * (2 if cfg.lora.enabled else 1) + conversion
    return one, need
