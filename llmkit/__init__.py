"""llmkit: fine-tune Hugging Face models with Accelerate + DeepSpeed ZeRO from one YAML recipe."""

from llmkit.config import Config, load_config
from llmkit.errors import LlmkitError

__version__ = "0.1.0"
__all__ = ["Config", "LlmkitError", "load_config", "__version__"]
