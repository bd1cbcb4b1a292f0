"""The export check's second process (`python -m llmkit.ship.reload KIND SPEC OUT`, started by ship.verify): the
export reloaded with plain transformers / peft, as a user loads it, in a fresh CPU interpreter with no DeepSpeed
state (under ZeRO-3 an in-process from_pretrained would partition the reloaded model across the ranks and wait);
its logits on the run's probe written to OUT as JSON. Nothing of llmkit touches the loading: only the 4-bit
settings (model.quantization) and the save options (canonical_names) are shared with the run."""

from __future__ import annotations

import inspect
import json
import os
import sys

import torch

from llmkit.model import quantization


def canonical_names(model) -> dict:
    """Save under the model's own parameter names. transformers 5 may otherwise map some back to legacy names
    (e.g. LayerNorm.gamma) depending on how the model was loaded, which differs under ZeRO-3."""
    params = inspect.signature(model.save_pretrained).parameters
    return {"save_original_format": False} if "save_original_format" in params else {}


def _on_base(auto, spec: dict, quantized: bool, **head):
    """The adapter on its base (QLoRA: the same 4-bit base as in training), as peft loads it."""
    from peft import PeftModel

    # the run's precision (older probes kept the torch dtype's name)
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(spec["quantized"], spec["quantized"])
    kwargs = {"quantization_config": quantization(precision)} if quantized else {}
    base = auto.from_pretrained(spec["base"], dtype=torch.float32, trust_remote_code=bool(spec.get(
        "trust_remote_code")), **head, **kwargs)
    return PeftModel.from_pretrained(base, spec["adapter"]).eval()


def _merge_into(peft, auto, spec: dict, head: dict, folder: str, tokenizer) -> None:
    """The adapter merged into its base, written as a plain model (a QLoRA adapter into the full-precision base:
    a model without bitsandbytes)."""
    if spec.get("quantized"):
        peft = _on_base(auto, spec, False, **head)
    merged = peft.merge_and_unload()
    merged.save_pretrained(folder, **canonical_names(merged))
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def classifier(spec: dict) -> dict:
    """A sequence classifier's logits on the probe texts; for a LoRA run the adapter's on its base too (and the
    merged classifier written where the export holds none)."""
    from transformers import AutoModelForSequenceClassification as Auto
    from transformers import AutoTokenizer

    remote, out = bool(spec.get("trust_remote_code")), {}

    def encode(tok):
        return tok(spec["texts"], spec["pairs"], padding=True, truncation=True, max_length=spec["max_length"],
                   return_tensors="pt")

    if spec.get("adapter"):
        peft = _on_base(Auto, spec, bool(spec.get("quantized")), **spec["head"])
        tok = AutoTokenizer.from_pretrained(spec["adapter"], trust_remote_code=remote)
        out["adapter_logits"] = peft(**encode(tok)).logits.float().tolist()
        if spec.get("merge"):
            _merge_into(peft, Auto, spec, spec["head"], spec["folder"], tok)
    tok = AutoTokenizer.from_pretrained(spec["folder"], trust_remote_code=remote)
    model, info = Auto.from_pretrained(spec["folder"], dtype="auto", trust_remote_code=remote,
                                       output_loading_info=True)
    out["logits"] = model.eval()(**encode(tok)).logits.float().tolist()
    return {**out, "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"])}


@torch.no_grad()
def causal_lm(spec: dict) -> dict:
    """A causal LM's logits on the probe ids, in fp32 and in the run's dtype; for a LoRA run the adapter's on its
    base too, and the merged model written into spec["model"] first."""
    from transformers import AutoModelForCausalLM as Auto
    from transformers import AutoTokenizer

    remote, ids, out = bool(spec.get("trust_remote_code")), torch.tensor(spec["ids"]), {}
    if spec.get("adapter"):
        peft = _on_base(Auto, spec, bool(spec.get("quantized")))
        out["base_plus_adapter"] = peft(input_ids=ids).logits.tolist()
        _merge_into(peft, Auto, spec, {}, spec["model"],
                    AutoTokenizer.from_pretrained(spec["adapter"], trust_remote_code=remote))
    model = Auto.from_pretrained(spec["model"], dtype=torch.float32, trust_remote_code=remote).eval()
    AutoTokenizer.from_pretrained(spec["model"], trust_remote_code=remote)  # the tokenizer must load too
    out["model"] = model(input_ids=ids).logits.tolist()
    # the run computed in bf16/fp16: compare with the same arithmetic, so a small weight error cannot hide in noise
    out["in_run_dtype"] = model.to(getattr(torch, spec["dtype"]))(input_ids=ids).logits.float().tolist()
    return out


KINDS = {"classifier": classifier, "causal_lm": causal_lm}


def main(argv: list[str] | None = None) -> None:
    """KIND SPEC OUT: the reload of one export kind, its answer written to OUT."""
    kind, spec_path, out_path = argv or sys.argv[1:]
    with open(spec_path) as fh:
        answer = KINDS[kind](json.load(fh))
    with open(out_path, "w") as fh:
        json.dump(answer, fh)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the answer is written: skip the interpreter teardown of torch and transformers (~1.7 s)


if __name__ == "__main__":
    main()
