"""Text generation from a model in training or an export (commands.generate_text loads it)."""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError


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
