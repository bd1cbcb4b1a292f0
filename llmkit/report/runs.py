"""What a run was, in words a reader scans: the settings that decide its numbers (from its training_config.yaml),
the facts of the run formatted for people, for several runs the settings in which they differ (the first thing a
user comparing variants asks), and a re-score said beside the run's own number on the same rows."""

from __future__ import annotations

from llmkit.config.typed import flatten

# the settings a reader of a report asks for first, in this order: (label, config section, key)
SETTINGS = [("learning rate", "train", "learning_rate"), ("batch per device", "train", "per_device_batch_size"),
            ("gradient accumulation", "train", "gradient_accumulation_steps"), ("epochs", "train", "epochs"),
            ("max steps", "train", "max_steps"), ("warmup ratio", "train", "warmup_ratio"),
            ("weight decay", "train", "weight_decay"), ("scheduler", "train", "lr_scheduler"),
            ("class weights", "train", "class_weights"), ("seed", "train", "seed"),
            ("max length", "data", "max_length"), ("text column", "data", "text_column"),
            ("text pair column", "data", "text_pair_column"), ("label column", "data", "label_column"),
            ("prompt template", "data", "prompt_template"), ("label words", "data", "label_words"),
            ("LoRA rank", "lora", "r"), ("LoRA alpha", "lora", "alpha"), ("QLoRA (4-bit base)", "lora", "load_in_4bit")]
SKIPPED_IN_DIFFERENCES = ("output.", "hub.", "tracking.")  # where a run writes and logs, not what it computes


def settings(config: dict) -> dict[str, object]:
    """The settings of SETTINGS the run's config holds (LoRA's only where LoRA is on; unset keys left out)."""
    lora = bool((config.get("lora") or {}).get("enabled"))
    out = {}
    for label, section, key in SETTINGS:
        value = (config.get(section) or {}).get(key)
        if value is None or (section == "lora" and (not lora or value is False)):
            continue
        out[label] = value
    return out


def _words(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(_words(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_words(v)}" for k, v in value.items() if v is not None)
    return str(value)


def duration(seconds) -> str:
    """308.9 -> "308.9 s (5 min 9 s)"."""
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{seconds:.1f} s ({f'{hours} h ' if hours else ''}{minutes} min {rest} s)"


def shown(run: dict) -> list[list[str]]:
    """The report's "What was run" rows: (label, value in words); the settings first, then the run's facts."""
    rows = [[label, _words(value)] for label, value in (run.get("settings") or {}).items()]
    for key, value in run.items():
        if key == "settings" or value is None:
            continue
        if key == "train_seconds":
            rows.append(["train time", duration(value)])
        elif key == "versions":
            rows.append(["versions", ", ".join(f"{k} {v}" for k, v in value.items() if v)])
        else:
            rows.append([key.replace("_", " "), _words(value)])
    return rows


def differences(configs: list[dict]) -> list[list[str]]:
    """Every config key whose value is not the same in all runs: [key, value in run 1, value in run 2, ...]
    (a key a run does not have reads "-")."""
    flats = [flatten(c or {}) for c in configs]
    keys = sorted({k for f in flats for k in f if not k.startswith(SKIPPED_IN_DIFFERENCES)})
    rows = []
    for key in keys:
        values = [f.get(key) for f in flats]
        if any(v != values[0] for v in values[1:]):
            rows.append([key, *["-" if v is None else _words(v) for v in values]])
    return rows


def rescored(reported: dict, accuracy: float) -> str:
    """A re-score beside the number the export's own run reported on the same rows (`llmkit eval`'s
    run_reported), and why the two differ where they do."""
    if not reported.get("rows_predicted_differently"):
        return f"the run reported the same accuracy on these rows ({reported['accuracy']:.4f}): every row is " \
               "predicted alike"
    return f"the run reported accuracy {reported['accuracy']:.4f} on these rows, this re-score {accuracy:.4f}: " \
           f"{reported['why']}"
