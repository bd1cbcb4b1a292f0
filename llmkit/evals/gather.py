"""The one evaluation pass every scorer shares: each rank scores its batches, `gather_for_metrics` brings the
results together without the padding duplicates, so N ranks give exactly the single-process numbers."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm


@torch.no_grad()
def gather_split(accelerator, model, loader, score: Callable[[dict], dict], desc: str = "eval"
                 ) -> dict[str, np.ndarray]:
    """Run `score(batch) -> {name: per-row tensor}` over a split in eval mode; return each name's rows from
    every rank, concatenated, as numpy arrays."""
    model.eval()
    parts: dict[str, list] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        scored = score(batch)
        gathered = accelerator.gather_for_metrics(tuple(scored.values()))
        for key, value in zip(scored, gathered):
            parts.setdefault(key, []).append(value.cpu().numpy())
    model.train()
    return {k: np.concatenate(v) for k, v in parts.items()}
