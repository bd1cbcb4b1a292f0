"""The model card (README.md) of a pushed run, built with huggingface_hub's card API: metadata with a
model-index of the run's results, then what it is, how it was trained, results, how to use it, limitations."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit import assets, compression
from llmkit.metrics import averaging, metric_label, shown
from llmkit.rundir.layout import ADAPTER, MERGED, Export, RunDir

LICENSES = {"sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
            "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
DATASET_NAMES = {"asset:polarity": "sentence-polarity (movie review snippets of Hutto & Gilbert 2014)"}
SPLITS = ("test", "validation")


def card_metrics(metrics: dict) -> list[str]:
    """The results' metrics, each once (for more than two labels `f1` is the macro F1), that some split has."""
    names = (*shown(metrics.get("label_names")), "perplexity")
    return [n for n in names if any(isinstance((metrics.get(s) or {}).get(n), (int, float)) for s in SPLITS)]


def _metric_args(name: str, label_names) -> dict | None:
    """How an F1, precision or recall averages, as the `evaluate` module's arguments (model-index `args`)."""
    if name == "f1_macro":
        return {"average": "macro"}
    if name in ("f1", "precision", "recall") and label_names:
        how = averaging(label_names)
        return {"average": how["f1_average"], **({"pos_label": how["f1_positive_label"]}
                                                  if "f1_positive_label" in how else {})}
    return None


def eval_results(metrics: dict, task: str, dataset_id: str, dataset_name: str) -> list:
    """One EvalResult per (split, metric) the run measured: the card's model-index. Each is named by what it is of
    ("F1 (positive: legit)", "F1 (macro)"), with the `evaluate` type and its averaging in args."""
    from huggingface_hub import EvalResult

    names, out = metrics.get("label_names"), []
    for split in SPLITS:
        for name in card_metrics(metrics):
            value = (metrics.get(split) or {}).get(name)
            if isinstance(value, (int, float)):
                out.append(EvalResult(task_type=task, dataset_type=dataset_id, dataset_name=dataset_name,
                                      dataset_split=split, metric_type="f1" if name == "f1_macro" else name,
                                      metric_name=metric_label(name, names), metric_args=_metric_args(name, names),
                                      metric_value=float(value)))
    return out


def _usage(kind: str, repo_id: str, cfg: dict, push_merged: bool) -> str:
    data = cfg.get("data") or {}
    if kind == "classification":
        text = ("```python\nfrom transformers import pipeline\n\n"
                f'classifier = pipeline("text-classification", model="{repo_id}")\n'
                'print(classifier("A gorgeous, witty and deeply moving film."))\n```')
        if (cfg.get("lora") or {}).get("enabled"):
            text += ("\n\nThat is the merged model (base + LoRA, no peft needed). The LoRA adapter itself, with the "
                     f"trained classification head, is in `{ADAPTER}/` (`PeftModel.from_pretrained(base, "
                     f'"{repo_id}", subfolder="{ADAPTER}")` on the base built with this config\'s labels).')
        return text
    prompt = "Write one sentence about the sea."
    if data.get("prompt_template"):
        prompt = data["prompt_template"].replace("{text}", "A gorgeous, witty and deeply moving film.")
    messages = json.dumps([{"role": "user", "content": prompt}])
    if kind == "lora":
        text = ("The adapter is at the repo root; peft fetches its base model.\n\n```python\n"
                "from transformers import pipeline\n\n"
                f'generator = pipeline("text-generation", model="{repo_id}")  # needs `pip install peft`\n'
                f"print(generator({messages}, max_new_tokens=8)[0]['generated_text'][-1])\n```")
        if push_merged:
            text += (f"\n\nThe merged model (base + adapter, no peft needed) is in `{MERGED}/`:\n\n```python\n"
                     "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                     f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="{MERGED}")\n'
                     f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", subfolder="{MERGED}")\n```')
        return text
    return ("```python\nfrom transformers import pipeline\n\n"
            f'generator = pipeline("text-generation", model="{repo_id}")\n'
            f"print(generator({messages}, max_new_tokens=32)[0]['generated_text'][-1])\n```")


def build(run: RunDir, final: Path, kind: str, repo_id: str, push_merged: bool = False) -> str:
    """README.md text for the pushed folder of `run`, whose export is `final`."""
    from huggingface_hub import ModelCard, ModelCardData

    export = Export(final)
    cfg = run.read_config() or export.read_config()
    metrics = export.read_metrics() or run.read_metrics()
    info = run.read_run_info()
    model_cfg, data, train, lora = (cfg.get(k) or {} for k in ("model", "data", "train", "lora"))
    base_ref = model_cfg.get("name_or_path")
    base = None if model_cfg.get("from_scratch") else assets.hub_id(base_ref)
    dataset_ref = data.get("dataset") or "local files"
    dataset_id = assets.hub_id(dataset_ref) if data.get("dataset") and not dataset_ref.startswith("asset:") else None
    dataset_name = DATASET_NAMES.get(dataset_ref, dataset_ref)
    mixture = metrics.get("data_mixture") or []
    hub_datasets = [dataset_id] if dataset_id else [
        i for i in (assets.hub_id(m["source"]) for m in mixture if not m["source"].startswith("asset:")) if i]
    labels = "accuracy" in (metrics.get("test") or metrics.get("validation") or {})
    task = "text-classification" if labels else "text-generation"
    summary = metrics.get("train") or {}
    stage = summary.get("zero_stage", info.get("zero_stage"))
    tags = ["llmkit", "deepspeed", f"zero-{stage}" if stage is not None else "ddp"]
    if kind == "lora" or lora.get("enabled"):
        tags.append("lora")
    card_data = ModelCardData(
        language="en", license=cfg.get("output", {}).get("hub_license") or LICENSES.get(base or "", "other"),
        library_name="peft" if kind == "lora" else "transformers",
        base_model=base, datasets=hub_datasets or None,
        metrics=list(dict.fromkeys("f1" if m == "f1_macro" else m for m in card_metrics(metrics))) or None,
        pipeline_tag="text-classification" if kind == "classification" else "text-generation",
        tags=tags, model_name=repo_id.split("/")[-1],
        eval_results=eval_results(metrics, task, dataset_id or dataset_ref, dataset_name) or None,
    )

    what, base_text, data_text = _described(kind, cfg, metrics, base, dataset_id, dataset_name)

    columns = card_metrics(metrics)
    rows = _result_rows(metrics, columns)
    hyper = _settings(cfg, info, summary, kind == "lora" or lora.get("enabled"))
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items() if v)
    body = f"""
# {repo_id.split("/")[-1]}

This is {what}, fine-tuned from {base_text} on {data_text} with llmkit
(Accelerate + DeepSpeed ZeRO data parallelism).

## Results

| split | {" | ".join(metric_label(k, metrics.get("label_names")) for k in columns)} | rows |
|---|{"---|" * len(columns)}---|
{chr(10).join(rows) if rows else "| - | (no evaluation recorded) |"}

{_copies(final)}## How to use

{_usage(kind, repo_id, cfg, push_merged)}

{_mixture_table(mixture)}## Training

| setting | value |
|---|---|
{chr(10).join(f"| {k} | {v} |" for k, v in hyper)}

Hardware: {info.get("device", "not recorded")}; wall time of training {summary.get("train_seconds", "-")} s,
{summary.get("samples_per_second", "-")} samples/s. Libraries: {versions or "not recorded"}.
The full resolved config is `{export.config.name}`; the evaluation report is `{run.report("html").name}` /
`{run.report("md").name}`.

## Limitations

- It learned from {data_text} only: expect it to be less accurate on text unlike that data (other domains,
  languages, lengths) and to inherit that data's biases.
- The numbers above come from one run with one seed on the named splits; the report gives 95% bootstrap
  intervals for accuracy and F1 where they apply.
- {"Base-model limitations apply: see " + base_text + "." if base else "It was not built on a published base model."}
"""
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


def _described(kind: str, cfg: dict, metrics: dict, base: str | None, dataset_id: str | None,
               dataset_name: str) -> tuple[str, str, str]:
    """In words: what the model is, what it was fine-tuned from, and on what."""
    model_cfg, data = cfg.get("model") or {}, cfg.get("data") or {}
    base_ref, mixture = model_cfg.get("name_or_path"), metrics.get("data_mixture") or []
    what = {"classification": "a sequence classifier", "causal_lm": "a causal language model",
            "lora": "a LoRA adapter for a causal language model"}[kind]
    if data.get("prompt_template"):
        what += (", tuned to answer with a label word (" + ", ".join(metrics.get("label_names") or []) +
                 "); predictions score each label word by log-likelihood")
    base_text = f"[{base}](https://huggingface.co/{base})" if base else (
        "a randomly initialised model (trained from scratch)" if model_cfg.get("from_scratch") else f"`{base_ref}`")
    if base and base_ref and base_ref.startswith("asset:smollm2"):
        base_text += " (as dequantised from its Q4_1 GGUF, the llmkit offline asset)"
    data_text = f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id})" if dataset_id else dataset_name
    if mixture:
        data_text = f"a mixture of {len(mixture)} sources (see Training data)"
    return what, base_text, data_text


def _result_rows(metrics: dict, columns: list[str]) -> list[str]:
    """The Results table's rows: each scored split's numbers under `columns`."""
    rows = []
    for split in ("validation", "test"):
        m = metrics.get(split) or {}
        if m:
            rows.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) else "-"
                                                      for k in columns) + f" | {m.get('samples', '-')} |")
    return rows


def _settings(cfg: dict, info: dict, summary: dict, lora_on: bool) -> list[tuple[str, object]]:
    """The Training table: the settings that decide the numbers."""
    data, train, lora = (cfg.get(k) or {} for k in ("data", "train", "lora"))
    world = summary.get("world_size", info.get("world_size"))
    accumulation = (info.get("resolved") or {}).get("gradient_accumulation_steps") \
        or train.get("gradient_accumulation_steps", 1)
    hyper = [("learning rate", train.get("learning_rate")), ("scheduler", train.get("lr_scheduler")),
             ("warmup ratio", train.get("warmup_ratio")), ("weight decay", train.get("weight_decay")),
             ("optimizer steps", summary.get("steps")), ("epochs", summary.get("epochs")),
             ("batch size", f"{train.get('per_device_batch_size')} per device x {world} devices x {accumulation} "
                            "accumulation"),
             ("max length", data.get("max_length")), ("precision", summary.get("precision", info.get("precision"))),
             ("DeepSpeed ZeRO stage", summary.get("zero_stage", info.get("zero_stage"))), ("seed", train.get("seed"))]
    if summary.get("class_weights"):
        hyper.append(("class weights (loss)", ", ".join(f"{n} {w:.3g}" for n, w in summary["class_weights"].items())))
    if lora_on:
        hyper += [("LoRA r / alpha / dropout", f"{lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')}"),
                  ("LoRA target modules", lora.get("target_modules") or "per-architecture default")]
    return hyper


def _copies(final: Path) -> str:
    """The quantized copies uploaded beside the model (one folder each), one line each with what it costs."""
    lines = []
    for c in compression.copies(final):
        n, f, q = c["numbers"], c["numbers"]["full"], c["numbers"]["copy"]
        cost = [f"accuracy {q['accuracy']:.4f} (full model {f['accuracy']:.4f}), agreement {n['agreement']:.4f}"] \
            if "accuracy" in q else []
        if "perplexity" in q:
            cost.append(f"perplexity {q['perplexity']:.4f} (full model {f['perplexity']:.4f})")
        if "speedup_batch_1" in n:
            cost.append(f"{n['speedup_batch_1']:.2f}x / {n['speedup_batch_32']:.2f}x faster per row at batch 1 / 32")
        lines.append(f"- `{c['format']}/`: {c['what']}. {n['size_ratio']:.2f}x smaller on disk; "
                     f"{'; '.join(cost)}; {n['rows']} rows of {n['split']}, {c['scored']}.")
    if not lines:
        return ""
    return "## Quantized copies\n\nEach scored against the full model on the same rows:\n\n" + \
        "\n".join(lines) + "\n\n"


def _mixture_table(sources: list[dict]) -> str:
    """The training data of a mixture: each source's weight and what it gave (examples drawn, tokens)."""
    if not sources:
        return ""
    rows = "\n".join(f"| {s['source']} | {s['weight']:g} ({s['weight_share']:.1%}) | {s['examples']} of "
                     f"{s['available']} ({s['drawn_share']:.1%}) | {s['tokens']} |" for s in sources)
    return ("## Training data\n\nSources interleaved by weight (the share of training examples drawn from each):\n\n"
            "| source | weight | examples drawn | tokens |\n|---|---|---|---|\n" + rows + "\n\n")
