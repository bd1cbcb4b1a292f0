"""Where training is in its data, owned by one class: the epoch, the batches of it this rank has consumed (kept
in the checkpoint's TrainerState), a stream's place, and the RNG state a resume restores.

Why not torchdata's StatefulDataLoader (Accelerate's `use_stateful_dataloader`)? It saves each rank's iterator
state, which resumes on the same ranks only. An elastic resume continues on another number of ranks
(llmkit.rundir.elastic): its position is a count in the global sequence of micro-batches, which does not depend
on how a step is split among ranks, divided among the new ranks; a per-rank iterator state cannot say that. So
the position is a count of batches, skipped by index (Accelerate's `skip_first_batches`) without loading them."""

from __future__ import annotations

import itertools

from llmkit.data.streaming import StreamLoader, to_device
from llmkit.rundir import checkpoints


class DataPosition:
    """One epoch's batches at a time, from where `state` says this rank is; counts each batch it hands out."""

    def __init__(self, run, loader, state: checkpoints.TrainerState, saved: dict | None):
        self.acc, self.loader, self.state = run.accelerator, loader, state
        self.stream = isinstance(loader, StreamLoader)  # data.streaming: sharded by rank already, no length
        batch_sampler = getattr(loader, "batch_sampler", None)
        self.sampler = getattr(batch_sampler, "batch_sampler", batch_sampler)
        if run.elastic is not None and hasattr(self.sampler, "per_step"):
            self.sampler.per_step = run.elastic.saved_micro  # a new global batch keeps the checkpoint's order
        if self.stream and saved is not None:  # a resumed stream starts where its saved state points
            loader.load_state_dict(saved["stream"])
        self.rng = saved  # this rank's RNG states of the checkpoint, restored once its first batch is drawn

    def epoch(self):
        """The batches of the current epoch from the saved position, on the device."""
        # Accelerate's loader sets its sampler's epoch from its own count of finished passes, which a resumed
        # run's first (skipping) pass does not advance: set both
        for owner in (self.loader, self.sampler):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(self.state.epoch)
        if self.stream:
            batches = (to_device(b, self.acc.device) for b in self.loader)
        else:
            skip = self.state.batches_in_epoch
            batches = iter(self.acc.skip_first_batches(self.loader, skip) if skip else self.loader)
        if self.rng is not None:
            # restored once the epoch's first batch is drawn: whatever starting the iterator draws (a sampler's,
            # a worker's seed) the uninterrupted run drew before the checkpoint too
            first = next(batches, None)
            checkpoints.set_rng_state(self.rng)
            self.rng = None
            batches = itertools.chain([first] if first is not None else [], batches)
        for batch in batches:
            self.state.batches_in_epoch += 1  # counted as it is handed out: a checkpoint after it includes it
            yield batch

    def end_of_epoch(self) -> bool:
        """After a step: did it finish the epoch? The saved position is then the start of the next one."""
        if self.stream or not self.acc.gradient_state.end_of_dataloader:
            return False
        self.state.epoch, self.state.batches_in_epoch = self.state.epoch + 1, 0
        return True

    def saved(self) -> dict | None:
        """What a checkpoint keeps beside this rank's RNG states: a stream's exact place."""
        return {"stream": self.loader.state_dict()} if self.stream else None

    def examples(self) -> int:
        """Training rows over all ranks (a stream counts the rows it read)."""
        return self.loader.examples * self.acc.num_processes if self.stream else len(self.loader.dataset)
