"""llmkit: fine-tune Hugging Face models with Accelerate + DeepSpeed ZeRO from one YAML recipe."""

import logging

# peft imports torchao (installed for `llmkit quantize --to torchao-int8`) in every process, which then warns about
# its CUDA kernels on a CPU machine and about torch's pytree registrations: noise in every run's log, not news
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from llmkit.config import Config, load_config  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Config", "LlmkitError", "load_config", "__version__"]
