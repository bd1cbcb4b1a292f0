"""The training loader (llmkit.data.loaders): a row that fails to load is named with its index, on whichever rank
reads it; an epoch's order depends on the seed and the epoch alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import faulty_run

from llmkit.data import loaders


@pytest.mark.slow
def test_a_broken_training_row_is_named_even_on_another_rank(tmp_path, tiny_bert, tiny_data):
    # the length-grouped sampler deals row 5 to some rank in the first steps; only that rank fails
    out, _, proc = faulty_run(tmp_path, tiny_bert, tiny_data, 2, "row@5:1")
    errors = [line for line in proc.stderr.splitlines() if "llmkit: error" in line]
    assert errors, proc.stderr[-3000:]
    assert "reading training row 5 failed: ValueError: a broken row (injected)" in errors[0]
    assert not (out / "final").exists()


@pytest.mark.parametrize("grouped", [True, False], ids=["length-grouped", "shuffled"])
def test_an_epochs_order_and_the_rng_after_it_depend_on_the_seed_and_epoch_alone(grouped):
    """DataLoader workers (persistent: one iterator a run) and a resume into a later epoch see the rows a plain
    run sees, and leave torch's RNG (dropout's) where it leaves it: neither the shuffle nor the global RNG gives
    the DataLoader its worker seeds."""
    def loader(workers):
        cfg = SimpleNamespace(data=SimpleNamespace(group_by_length=grouped),
                              train=SimpleNamespace(per_device_batch_size=4, gradient_accumulation_steps=1, seed=7,
                                                    dataloader_workers=workers, pin_memory=False))
        return loaders.train_loader(cfg, list(range(42)), [i % 5 for i in range(42)], torch.tensor, 0, 1)

    def epochs(dl, first, n):
        torch.manual_seed(1000)
        seen = []
        for epoch in range(first, first + n):
            dl.batch_sampler.set_epoch(epoch)
            seen.append((torch.cat(list(dl)).tolist(), float(torch.rand(1))))  # the order, then the next draw
        return seen

    plain = epochs(loader(0), 0, 3)
    assert sorted(plain[0][0]) == list(range(42)) and plain[0][0] != plain[1][0] != plain[2][0]
    assert epochs(loader(2), 0, 3) == plain  # two persistent workers
    assert epochs(loader(0), 2, 1)[0][0] == plain[2][0]  # a run resumed in its third epoch
