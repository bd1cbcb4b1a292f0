"""Text generation from an export (full model, merged model or LoRA adapter) and from a model in training."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmkit.errors import LlmkitError
from llmkit.model import check_export_weights, is_causal_lm, locate, trusts_remote_code
from llmkit.rundir.layout import Export


def render(tokenizer, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt: as a user turn of the chat template when the tokenizer has one (or `chat`)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LlmkitError("--chat needs a tokenizer with a chat template; this one has none")
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, chat: bool | None = None,
             temperature: float = 0.0, top_p: float = 1.0, synced: bool = False) -> list[str]:
    """One completion per prompt (greedy unless temperature > 0). `synced` keeps ZeRO-3 ranks in step: every rank
    must call this with the same prompts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts = []
    for prompt in prompts:  # one at a time: no left-padding subtleties, and prompts are few
        ids = torch.tensor([render(tokenizer, prompt, chat)], device=device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, synced_gpus=synced, **sampling)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return texts


def load(folder: str | Path, base: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, description) from a folder llmkit exported, or any transformers / peft folder.

    A run's `final/` with `merged/` uses the merged model; an adapter folder loads its base (from
    adapter_config.json, or `base`) and applies the adapter. `trust_remote_code` (or an llmkit export trained
    with it) runs the folder's own model code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise LlmkitError(f"'{folder}' is not a directory; pass a model folder (e.g. <output_dir>/final)")
    check_export_weights(path)
    remote = trust_remote_code or trusts_remote_code(path)
    if (Export(path).merged / "config.json").is_file():
        path = Export(path).merged
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise LlmkitError(f"{path}/adapter_config.json names no base model; pass --base")
        model = AutoModelForCausalLM.from_pretrained(locate(base, "the adapter's base model"), trust_remote_code=remote)
        model = PeftModel.from_pretrained(model, path)
        what = f"base {base} + LoRA adapter {path}"
    elif (path / "config.json").is_file():
        architectures = json.loads((path / "config.json").read_text()).get("architectures")
        if architectures and not is_causal_lm(architectures):
            raise LlmkitError(f"'{folder}' is a {architectures[0]}, not a causal LM: `llmkit generate` completes text "
                              "with a causal LM export; score a classifier with `llmkit eval`")
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote)
        what = str(path)
    else:
        raise LlmkitError(f"'{folder}' holds no config.json or adapter_config.json: not a model export")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, what
