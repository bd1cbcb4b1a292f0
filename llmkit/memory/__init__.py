"""What a run needs, sized before it starts: memory per device (and host), one estimate, `for_settings`, that
`llmkit estimate-memory` prints and the preflight checks; and disk. states: parameters, gradients and optimizer
states as DeepSpeed (or torch) allocates them; estimate: the terms, their table and the refusal of a run that
cannot fit; settings: a run's settings and the one function over them; disk: checkpoints and the export."""

from llmkit.memory.disk import checkpoint_bytes, disk_bytes
from llmkit.memory.estimate import (
    LIVE,
    MemoryEstimate,
    check_fits,
    eval_logits_bytes,
    logits_bytes,
    width,
)
from llmkit.memory.settings import (
    NF4_BYTES,
    Settings,
    file_width,
    for_run,
    for_settings,
    frozen_width,
    load_width,
    resident_bytes,
    settings_of,
)
from llmkit.memory.states import (
    bucket_bytes,
    estimate,
    gathered_bytes,
    largest_of,
    load_bytes,
    offload_bytes,
    parameters_of,
)

__all__ = ["LIVE", "NF4_BYTES", "MemoryEstimate", "Settings", "bucket_bytes", "check_fits", "checkpoint_bytes",
           "disk_bytes", "estimate",
           "eval_logits_bytes", "file_width", "for_run", "for_settings", "frozen_width", "gathered_bytes",
           "largest_of", "load_bytes", "load_width", "logits_bytes", "offload_bytes", "parameters_of",
           "resident_bytes", "settings_of", "width"]
