"""An export folder opened once: its kind, the folder that holds the model, its LoRA adapter and base, its labels,
and the run's records that go with it (prompt template, label words, max length, columns). Every command and
library path that reads an export asks here; none repeats "use merged/ when it is there" or reads an export's
config.json to guess what it is."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmkit import model as models
from llmkit.errors import LlmkitError
from llmkit.rundir import layout
from llmkit.rundir.layout import ADAPTER_CONFIG, MODEL_CONFIG

CLASSIFIER = "classifier"  # a sequence classifier (a LoRA run's: merged at the root, the adapter and head in adapter/)
LABEL_WORDS = "label_words"  # a causal LM that classifies by label words (its run's prompt template, or given)
CAUSAL_LM = "causal_lm"  # any other causal LM: full, merged from a LoRA run, or an adapter on its base


def read_model_config(folder: Path) -> dict:
    """A model folder's config.json as a dict ({} where there is none)."""
    return layout.read_json(Path(folder) / MODEL_CONFIG)


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def holds_model(folder: Path) -> bool:
    """The folder holds a model's own files (transformers' config.json): a full or merged model, a LoRA
    classifier's merged one, a quantized copy; not an adapter alone."""
    return (Path(folder) / MODEL_CONFIG).is_file()


def is_export(folder: Path) -> bool:
    """The folder is an exported model itself (a run's final/ or a copy of it), not a run directory: it holds a
    model, or a LoRA run's adapter/."""
    return holds_model(folder) or layout.Export(Path(folder)).adapter.is_dir()


def adapter_base(folder: Path) -> str | None:
    """The base model an adapter folder names."""
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def records_beside(path: Path) -> tuple[dict, dict, Path | None]:
    """The training config and metrics an export carries (final/ holds both; a run folder, or the folder above a
    merged/ or adapter/, too), and the run folder when the export is a run's final/."""
    for folder in (path, path.parent, path.parent.parent):
        records = layout.Export(folder)  # final/ and its run folder name their config and metrics alike
        if records.config.is_file():
            try:
                config = records.read_config()
            except yaml.YAMLError:
                config = {}
            run = folder.parent if layout.RunDir(folder.parent).final.root == folder else None
            return config if isinstance(config, dict) else {}, records.read_metrics(), run
    return {}, {}, None


@dataclass(frozen=True)
class Opened:
    """What an export folder holds, decided once (open_export)."""
    root: Path  # the export (a run directory stands for its final/)
    kind: str  # CLASSIFIER | LABEL_WORDS | CAUSAL_LM
    model: Path | None  # the folder holding the model's own files (None: an adapter without a merged model)
    adapter: Path | None  # the LoRA adapter's folder, where there is one
    base: str | None  # the adapter's base model, as its adapter_config.json names it
    architectures: list[str]
    labels: list[str] | None  # class names in id order (a classifier's id2label; a label-word run's names)
    data: dict = field(default_factory=dict)  # the run's data settings (training_config.yaml), {} without records
    metrics: dict = field(default_factory=dict)  # the run's metrics.json
    run: Path | None = None  # the run folder of a run's final/
    trust_remote_code: bool = False  # the run was trained with it: reloading needs the same consent
    copy_of: str | None = None  # a quantized copy's format (a folder with quantized.json), else None

    @property
    def prompt_template(self) -> str | None:
        return self.data.get("prompt_template")

    @property
    def label_words(self) -> list[str] | None:
        return self.data.get("label_words") or (self.labels if self.kind == LABEL_WORDS else None)

    @property
    def max_length(self) -> int | None:
        return self.data.get("max_length")

    @property
    def is_causal_lm(self) -> bool:
        return self.kind in (LABEL_WORDS, CAUSAL_LM)

    @property
    def name(self) -> str:
        """A short name for tables: the run's folder for a run's final/, else the folder's own."""
        return self.run.name if self.run is not None else self.root.name

    def require(self, *kinds: str, command: str) -> Opened:
        """This export, or one line saying the command takes other kinds of model."""
        if self.kind not in kinds:
            said = {CLASSIFIER: "a sequence classifier", LABEL_WORDS: "an llmkit label-word causal LM",
                    CAUSAL_LM: "a causal LM"}
            raise LlmkitError(f"{self.root} is {said[self.kind]}: {command} takes "
                              + " or ".join(said[k] for k in kinds))
        return self


def export_of(path: Path) -> Path:
    """A run directory stands for its export (final/); anything else is the folder itself."""
    final = layout.RunDir(path).final.root
    return final if not holds_model(path) and not is_adapter(path) and final.is_dir() else path


def open_export(path: str | Path, prompt_template: str | None = None, label_words: list[str] | None = None,
                max_length: int | None = None) -> Opened:
    """Open an export folder (a run's final/ or its run directory, a merged or full model folder, a LoRA adapter,
    a quantized copy). `prompt_template` and `label_words` make any causal LM a label-word classifier (zero-shot);
    `max_length` overrides the run's."""
    root = export_of(Path(path).expanduser())
    if not root.is_dir():
        raise LlmkitError(f"'{path}' holds no exported model: there is no such folder. Pass an exported model "
                          "folder (e.g. <run>/final)")
    config, metrics, run = records_beside(root)
    data = dict(config.get("data") or {})
    if prompt_template is not None:  # zero-shot: any causal LM, classifying by the words given
        words = list(label_words or [])
        if len(set(words)) != len(words) or len(words) < 2:
            raise LlmkitError(f"--label-words must list at least 2 distinct words, got {words}")
        if "{text}" not in prompt_template:
            raise LlmkitError(f"the prompt template {prompt_template!r} has no {{text}} slot for the text")
        data.update(prompt_template=prompt_template, label_words=words)
        metrics = {}  # the words are the labels, whatever a run beside the model classified
    if max_length is not None:
        data["max_length"] = max_length
    merged, adapter = layout.Export(root).merged, layout.Export(root).adapter
    folder = merged if holds_model(merged) else root if holds_model(root) else None
    adapter = adapter if is_adapter(adapter) else root if is_adapter(root) else None
    if folder is None and adapter is None:
        raise LlmkitError(f"{path} holds no exported model: it has no {MODEL_CONFIG} or {ADAPTER_CONFIG}. Give a "
                          "run's final/ folder, a run directory, or a model folder")
    architectures = (read_model_config(folder).get("architectures") or []) if folder else []
    kind, labels = _kind(folder, architectures, data, metrics, path)
    if prompt_template is not None and kind != LABEL_WORDS:
        raise LlmkitError(f"zero-shot scoring needs a causal LM; '{path}' is {', '.join(architectures)}")
    copy_of = layout.read_json(root / layout.QUANTIZED).get("format") if (root / layout.QUANTIZED).is_file() else None
    return Opened(root=root, kind=kind, model=folder, adapter=adapter,
                  base=adapter_base(adapter) if adapter is not None else None, architectures=architectures,
                  labels=labels, data=data, metrics=metrics, run=run,
                  trust_remote_code=bool((config.get("model") or {}).get("trust_remote_code")), copy_of=copy_of)


def _kind(folder: Path | None, architectures: list[str], data: dict, metrics: dict,
          given: str | Path) -> tuple[str, list[str] | None]:
    if models.is_causal_lm(architectures) or folder is None:  # llmkit exports only causal LMs as an adapter alone
        if not data.get("prompt_template"):
            return CAUSAL_LM, None
        words = data.get("label_words")
        names = metrics.get("label_names") or words
        if not names:
            raise LlmkitError(f"'{given}' is a label-word causal LM without the label names its run recorded "
                              "(metrics.json) or label words")
        return LABEL_WORDS, list(names if not words or len(names) == len(words) else words)
    if models.is_classifier(architectures):
        config = read_model_config(folder)
        # transformers leaves its default names (LABEL_0, LABEL_1, ...) out of a saved config
        id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
        if len(id2label) < 2:
            raise LlmkitError(f"'{given}' is not a classifier with labels (its config has no id2label)")
        return CLASSIFIER, [id2label[str(i)] for i in range(len(id2label))]
    named = ", ".join(architectures) or "model of no stated architecture"
    raise LlmkitError(f"'{given}' is neither a sequence classifier nor a causal LM ({named}), so it is not a "
                      "fine-tuned classifier: with no classification head its predictions would be random. Give a "
                      "fine-tuned export (e.g. <run>/final) or a causal LM")
