"""An opened export's model and tokenizer, loaded with plain transformers / peft on CPU: a classifier (refused when
its head is not in the checkpoint, so it would score at random), or a causal LM (full, merged, or an adapter on
its base). One loader per kind, for every command and library path that runs an export."""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.exported.opened import CLASSIFIER, Opened
from llmkit.model import check_export_weights, locate


def _remote(opened: Opened, trust_remote_code: bool) -> bool:
    return trust_remote_code or opened.trust_remote_code


def tokenizer_of(opened: Opened, folder=None, trust_remote_code: bool = False):
    """The export's tokenizer (from the model folder, else the adapter's), with a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder or opened.model or opened.adapter,
                                        trust_remote_code=_remote(opened, trust_remote_code))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def classifier(opened: Opened, trust_remote_code: bool = False, dtype=torch.float32):
    """(model, tokenizer) of a sequence classifier export, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    opened.require(CLASSIFIER, command="this command")
    check_export_weights(opened.model)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            opened.model, output_loading_info=True, dtype=dtype, trust_remote_code=_remote(opened, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise LlmkitError(f"'{opened.root}' does not load as a sequence classifier: {str(exc).splitlines()[0]}") \
            from None
    if info["missing_keys"]:  # a base model: transformers would score with a freshly initialised, random head
        missing = sorted(info["missing_keys"])
        raise LlmkitError(f"'{opened.root}' is not a fine-tuned classifier: {len(missing)} weights of its "
                          f"classification head are not in the checkpoint (e.g. {missing[0]}), so its predictions "
                          "would be random. Evaluate a fine-tuned export (e.g. <run>/final).")
    return model.eval(), tokenizer_of(opened, trust_remote_code=trust_remote_code)


def causal_lm(opened: Opened, base: str | None = None, trust_remote_code: bool = False, dtype=None):
    """(model, tokenizer, what was loaded) of a causal LM export: its model folder (a LoRA run's merged/), or its
    adapter on the base it names (or `base`)."""
    from transformers import AutoModelForCausalLM

    if not opened.is_causal_lm:
        raise LlmkitError(f"'{opened.root}' is a {', '.join(opened.architectures)}, not a causal LM")
    remote = _remote(opened, trust_remote_code)
    check_export_weights(opened.root)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if opened.model is not None:
        model, what = AutoModelForCausalLM.from_pretrained(opened.model, trust_remote_code=remote, **kwargs), \
            str(opened.model)
    else:
        from peft import PeftModel

        name = base or opened.base
        if not name:
            raise LlmkitError(f"{opened.adapter} names no base model in its adapter config; pass --base")
        model = AutoModelForCausalLM.from_pretrained(locate(name, "the adapter's base model"), trust_remote_code=remote,
                                                     **kwargs)
        model, what = PeftModel.from_pretrained(model, opened.adapter), f"base {name} + LoRA adapter {opened.adapter}"
    return model.eval(), tokenizer_of(opened, trust_remote_code=trust_remote_code), what
