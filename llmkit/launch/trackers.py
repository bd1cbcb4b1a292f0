"""Experiment trackers (train.report_to) through Accelerate's: checked before training (known name, package
installed, credentials where the tracker needs them), started on the main process with the resolved config as
hyperparameters, the run name and tags; text (sample generations) goes to the trackers that keep text.

TensorBoard writes to <output_dir>/runs as before; Weights & Biases keeps its files in <output_dir>/wandb;
MLflow, Trackio and the others use their own settings (MLFLOW_TRACKING_URI, TRACKIO_DIR, ...)."""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from llmkit.errors import LlmkitError
from llmkit.rundir.layout import RunDir

# Accelerate's tracker names, with the package each needs
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def names(cfg) -> list[str]:
    """train.report_to as a list of tracker names ([] for none)."""
    chosen = cfg.train.report_to
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    return [] if chosen in ([], ["none"]) else chosen


def _available(name: str) -> bool:
    from accelerate.utils import imports

    return getattr(imports, f"is_{name}_available")()


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _credentials(name: str) -> str | None:
    """What is missing for `name` to log (None when it can), for the trackers that need an account."""
    env = os.environ
    if name == "wandb":
        if env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or env.get("WANDB_API_KEY"):
            return None
        host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
        return None if _netrc_has(host) else ("no W&B credentials: run `wandb login`, set WANDB_API_KEY, or log "
                                              "locally with WANDB_MODE=offline")
    if name == "comet_ml":
        if env.get("COMET_API_KEY") or env.get("COMET_MODE", "").lower() == "offline" or \
                Path(env.get("COMET_CONFIG", "~/.comet.config")).expanduser().is_file():
            return None
        return "no Comet credentials: set COMET_API_KEY (or COMET_MODE=offline)"
    if name == "swanlab":
        if env.get("SWANLAB_API_KEY") or env.get("SWANLAB_MODE", "").lower() in ("offline", "local", "disabled"):
            return None
        return "no SwanLab credentials: set SWANLAB_API_KEY (or SWANLAB_MODE=local)"
    if name == "clearml":
        config = Path(env.get("CLEARML_CONFIG_FILE", "~/clearml.conf")).expanduser()
        if env.get("CLEARML_API_ACCESS_KEY") or config.is_file():
            return None
        return "no ClearML credentials: run `clearml-init` or set CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY"
    return None


def check(cfg) -> str:
    """Every tracker of train.report_to can start: a clear error before any training otherwise."""
    chosen = names(cfg)
    for name in chosen:  # every name first: a typo is named before another tracker's missing login
        if name not in PACKAGES:
            raise LlmkitError(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(PACKAGES)} "
                              "(or none)")
    if len(set(chosen)) != len(chosen):
        raise LlmkitError(f"train.report_to names a tracker twice: {chosen}")
    for name in chosen:
        if not _available(name):
            raise LlmkitError(f"train.report_to has {name}, but the {PACKAGES[name]} package is not installed: "
                              f"pip install {PACKAGES[name].replace('_', '-')} (or drop it from train.report_to)")
        missing = _credentials(name)
        if missing:
            raise LlmkitError(f"train.report_to has {name}, but {missing}")
    return "trackers: " + (", ".join(chosen) if chosen else "none (train.report_to: none)")


def log_with(cfg, run: RunDir) -> list:
    """For Accelerator(log_with=...): TensorBoard as a tracker object, so its folder stays <output_dir>/runs
    whatever the project is called."""
    from accelerate.tracking import TensorBoardTracker

    folder = run.tensorboard.name  # TensorBoard's events: <output_dir>/<folder>
    return [TensorBoardTracker(folder, run.root) if n == "tensorboard" else n for n in names(cfg)]


def hyperparameters(cfg, **facts) -> dict:
    """The resolved config as flat `section.key` values every tracker takes (lists, mappings and None as JSON
    text), plus `facts` (world size, precision, ...)."""
    flat = {}
    for section, values in {**cfg.to_dict(), "run": facts}.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def start(accelerator, cfg, run: RunDir, hparams: dict) -> None:
    """Start every tracker (Accelerate runs them on the main process only); a tracker that fails to start is a
    clear error, not a traceback from inside it."""
    t = cfg.train
    run_name = t.run_name or run.root.resolve().name
    tags = list(t.tracker_tags or [])
    init_kwargs = {
        "wandb": {"name": run_name, "tags": tags, "dir": str(run.root)},
        "mlflow": {"run_name": run_name, "tags": {tag: "true" for tag in tags}},
        "trackio": {"name": run_name},
        "aim": {"experiment": run_name},
        "swanlab": {"experiment_name": run_name, "tags": tags},
    }
    try:
        accelerator.init_trackers(t.tracker_project, config=hparams, init_kwargs=init_kwargs)
        if accelerator.is_main_process and tags:
            comet = _tracker(accelerator, "comet_ml")
            if comet is not None:
                comet.add_tags(tags)
    except LlmkitError:
        raise
    except Exception as exc:  # each tracker raises its own kinds: name the tracker and its complaint
        raise LlmkitError(f"starting the trackers of train.report_to ({', '.join(names(cfg))}) failed: "
                          f"{exc.__class__.__name__}: {str(exc).strip()[:500]}") from None


def _tracker(accelerator, name: str):
    for tracker in accelerator.trackers:
        if tracker.name == name:
            return tracker.tracker
    return None


def log_text(accelerator, key: str, text: str, step: int) -> None:
    """Text (markdown) to the trackers that keep it: TensorBoard, W&B, Trackio and Aim through Accelerate's log,
    MLflow and Comet as their own text records. Main process only."""
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            import mlflow

            mlflow.log_text(text, f"{key}/step-{step}.md")
        elif tracker.name == "comet_ml":
            tracker.tracker.log_text(text, step=step, metadata={"key": key})
        elif tracker.name in ("tensorboard", "wandb", "trackio", "aim"):
            tracker.log({key: text}, step=step)
