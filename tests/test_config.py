"""Config parsing, overrides, and every rejection: each message names the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import changed

from llmkit.config import Config, DataConfig, load_config
from llmkit.errors import LlmkitError
from llmkit.launch import parallel, precision, preflight
from llmkit.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


BASE = {"data": {"dataset": "some/dataset"}}


def test_yaml_and_overrides(tmp_path):
    path = _yaml(tmp_path, {**BASE, "train": {"learning_rate": "3e-5", "epochs": 2}})
    cfg = load_config(path, ["--train.per_device_batch_size", "4", "--seed=7", "--data.label_names", "[a, b]"])
    assert cfg.train.learning_rate == pytest.approx(3e-5)  # YAML reads 3e-5 as a string: still a float
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.per_device_batch_size == 4
    assert cfg.train.seed == 7
    assert cfg.data.label_names == ["a", "b"]


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(_yaml(tmp_path, BASE), ["--train.learning_rate", "2e-4"])
    cfg.save(tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_a_mixture_round_trips(tmp_path):
    mix = [{"dataset": "a", "weight": 3, "format": "alpaca"}, {"data_files": {"train": "b.jsonl"}, "weight": 1.5}]
    cfg = load_config(_yaml(tmp_path, {"data": {"mixture": mix}}), ["--data.max_length", "64"])
    assert [s.weight for s in cfg.data.mixture] == [3.0, 1.5] and cfg.data.mixture[0].format == "alpaca"
    cfg.save(tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_shipped_recipe_configs_are_valid():
    for path in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config)
    sst2 = load_config(ROOT / "recipes/configs/sentiment_distilbert_sst2.yaml")
    assert sst2.model.name_or_path == "distilbert/distilbert-base-uncased"
    assert sst2.data.dataset == "stanfordnlp/sst2" and sst2.data.test_split is None

    # the causal-LM configs: which data mode each selects; the Hub example is validated here, never run offline
    from llmkit.data.formats import choose
    from llmkit.model import locate

    modes = {name: choose(load_config(ROOT / "recipes/configs" / name).data).mode for name in (
        "sentiment_smollm2_lora.yaml", "smollm2_full_polarity_text.yaml", "hub_qwen2.5_0.5b_lora_no_robots.yaml")}
    assert modes == {"sentiment_smollm2_lora.yaml": "labels", "smollm2_full_polarity_text.yaml": "packed",
                     "hub_qwen2.5_0.5b_lora_no_robots.yaml": "chat"}
    hub = load_config(ROOT / "recipes/configs/hub_qwen2.5_0.5b_lora_no_robots.yaml")
    assert locate(hub.model.name_or_path, "model.name_or_path") == "Qwen/Qwen2.5-0.5B-Instruct"  # a Hub id as is
    assert hub.lora.enabled and hub.data.messages_column == "messages"


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({**BASE, "trian": {}}, [], "unknown config section 'trian' (did you mean 'train'?)"),
        ({"data": {"mixture": [{"dataset": "a", "wieght": 1}, {"dataset": "b", "weight": 1}]}}, [],
         "unknown config key 'data.mixture[0].wieght' (did you mean 'weight'?)"),
        ({"data": {"mixture": [{"dataset": "a"}, {"dataset": "b", "weight": 1}]}}, [],
         "config key 'data.mixture[0]' needs weight"),
        ({"data": {"mixture": [{"dataset": "a", "weight": 0}, {"dataset": "b", "weight": 1}]}}, [],
         "data.mixture[0].weight"),
        ({"data": {"dataset": "x", "mixture": [{"dataset": "a", "weight": 1}, {"dataset": "b", "weight": 1}]}}, [],
         "remove data.dataset / data.data_files, or the mixture"),
        ({"data": {"mixture": [{"dataset": "a", "weight": 1}]}}, [], "needs at least 2 sources"),
        ({**BASE, "data": {"dataset": "x", "format": "csv"}}, [], "data.format"),
        ({**BASE, "data": {"dataset": "x", "prompt_template": "no slot"}}, [],
         "config key 'data.prompt_template' must contain {text}"),
        ({**BASE, "data": {"dataset": "x", "prompt_template": "{text}", "label_words": ["yes", "yes"]}}, [],
         "config key 'data.label_words' must list at least 2 distinct, non-empty words"),
        ({**BASE, "data": {"dataset": "x", "label_words": ["no", "yes"]}}, [],
         "config key 'data.label_words' needs data.prompt_template"),
        ({**BASE, "data": {"dataset": "x", "prompt_template": "{text}", "messages_column": "m"}}, [],
         "config key 'data.prompt_template' builds prompts from text_column"),
        ({**BASE, "train": {"learnin_rate": 1e-4}}, [], "unknown config key 'train.learnin_rate' (did you mean 'learning_rate'?)"),
        ({**BASE, "train": {"epochs": "many"}}, [], "config key 'train.epochs' must be of type float, got 'many'"),
        ({**BASE, "train": {"per_device_batch_size": 2.5}}, [], "config key 'train.per_device_batch_size' must be of type int"),
        ({**BASE, "data": {"dataset": "x", "group_by_length": "yes"}}, [], "config key 'data.group_by_length' must be of type bool"),
        (BASE, ["--train.learning_rate", "-1e-4"], "config key 'train.learning_rate' must be > 0, got -0.0001"),
        (BASE, ["--train.warmup_ratio", "1.5"], "config key 'train.warmup_ratio' must be in [0, 1)"),
        (BASE, ["--output.explain_max_steps", "0"], "config key 'output.explain_max_steps' must be in [1, 4096]"),
        (BASE, ["--train.per_device_batch_size", "0"], "config key 'train.per_device_batch_size' must be >= 1"),
        (BASE, ["--train.precision", "fp8"], "config key 'train.precision' must be one of auto, fp32, bf16, fp16"),
        (BASE, ["--train.lr_scheduler", "step"], "config key 'train.lr_scheduler' must be one of linear, cosine"),
        (BASE, ["--data.validation_split", "''"], "config key 'data.validation_split' must name the evaluation split"),
        ({"data": {}}, [], "config key 'data.dataset' is missing"),
        ({"data": {"data_files": {"train": "a.csv", "validation": "b.csv"}}}, [],
         "config key 'data.test_split' names split 'test' but data.data_files only has ['train', 'validation']"),
        (BASE, ["--deepspeed.zero_stage", "4"], "config key 'deepspeed.zero_stage' must be one of 0, 1, 2, 3, got 4"),
        (BASE, ["--learning_rat", "1"], "unknown config key 'learning_rat' (did you mean 'train.learning_rate'?)"),
        (BASE, ["--train.epochs"], "override '--train.epochs' has no value"),
        (BASE, ["stray"], "unexpected argument 'stray'"),
    ],
)
def test_rejections_name_the_key(tmp_path, data, overrides, message):
    with pytest.raises(LlmkitError) as err:
        load_config(_yaml(tmp_path, data), overrides)
    assert message in str(err.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(LlmkitError, match="is not valid YAML"):
        load_config(_yaml(tmp_path, "train: [unclosed\n"))
    with pytest.raises(LlmkitError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_fp16_refused_on_cpu():
    with pytest.raises(LlmkitError, match="fp16, but no GPU is available"):
        precision.resolve_precision("fp16")
    resolved, why = precision.resolve_precision("auto")
    assert resolved == ("bf16" if precision.cpu_has_native_bf16() else "fp32") and why.startswith("auto")


def _cfg(tmp_path, **train) -> Config:
    return changed(load_config(_yaml(tmp_path, BASE)), {f"train.{k}": v for k, v in train.items()})


def test_deepspeed_autos_filled_from_llmkit_config(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    cfg = _cfg(tmp_path, per_device_batch_size=8, gradient_accumulation_steps=4, max_grad_norm=0.5)
    cfg = changed(cfg, {"deepspeed.config_file": str(ROOT / "ds_configs/zero3.json")})
    ds = parallel.resolve_deepspeed(cfg, "bf16", world_size=2, hidden=384)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 25_000_000  # hidden^2 = 147k would mean a collective per 147k grads
    assert parallel.resolve_deepspeed(cfg, "bf16", 2, hidden=8192)["zero_optimization"]["reduce_bucket_size"] == 8192**2
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 384 * 384)
    assert zero["stage3_param_persistence_threshold"] == 3840
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "auto" not in json.dumps(ds)


def test_deepspeed_value_set_twice_must_agree(tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}}))
    cfg = _cfg(tmp_path, gradient_accumulation_steps=4)
    cfg = changed(cfg, {"deepspeed.config_file": str(ds_file)})
    with pytest.raises(LlmkitError) as err:
        parallel.resolve_deepspeed(cfg, "fp32", world_size=2, hidden=32)
    msg = str(err.value)
    assert "'gradient_accumulation_steps' is 8 in the DeepSpeed config" in msg
    assert "4 from train.gradient_accumulation_steps" in msg


@pytest.mark.parametrize(
    ("json_values", "train", "precision", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, {"per_device_batch_size": 8}, "fp32",
         "'train_micro_batch_size_per_gpu' is 4 in the DeepSpeed config (ds.json) but 8 from "
         "train.per_device_batch_size"),
        ({"train_batch_size": 64}, {"per_device_batch_size": 8}, "fp32",
         "'train_batch_size' is 64 in the DeepSpeed config (ds.json) but 16 from train.per_device_batch_size x "
         "gradient_accumulation_steps x world size"),
        ({"gradient_clipping": 5.0}, {"max_grad_norm": 1.0}, "fp32",
         "'gradient_clipping' is 5.0 in the DeepSpeed config (ds.json) but 1.0 from train.max_grad_norm"),
        ({"bf16": {"enabled": True}}, {}, "fp32",
         "'bf16.enabled' is True in the DeepSpeed config (ds.json) but False from train.precision"),
        ({"fp16": {"enabled": False}}, {}, "fp16",
         "'fp16.enabled' is False in the DeepSpeed config (ds.json) but True from train.precision"),
    ],
)
def test_each_conflict_names_both_places(tmp_path, json_values, train, precision, message):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({**json_values, "zero_optimization": {"stage": 2}}))
    cfg = _cfg(tmp_path, **train)
    cfg = changed(cfg, {"deepspeed.config_file": str(ds_file)})
    with pytest.raises(LlmkitError) as err:
        parallel.resolve_deepspeed(cfg, precision, world_size=2, hidden=32)
    assert message.replace("ds.json", str(ds_file)) in str(err.value)
    assert "Set it to \"auto\" in the JSON" in str(err.value)


def test_zero_stage_in_llmkit_config_must_match_the_json(tmp_path):
    cfg = _cfg(tmp_path)
    cfg = changed(cfg, {"deepspeed.config_file": str(ROOT / "ds_configs/zero2.json")})
    cfg = changed(cfg, {"deepspeed.zero_stage": 3})
    with pytest.raises(LlmkitError, match="'zero_optimization.stage' is 2 in the DeepSpeed config .* but 3 from "
                                          "deepspeed.zero_stage"):
        parallel.resolve_deepspeed(cfg, "fp32", world_size=2, hidden=32)


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8", "gradient_accumulation_steps=8 but the llmkit config has "
         "train.gradient_accumulation_steps -> 1"),
        ("ACCELERATE_GRADIENT_CLIPPING", "2.0", "gradient_clipping=2.0 but the llmkit config has train.max_grad_norm"),
        ("ACCELERATE_MIXED_PRECISION", "bf16", "mixed_precision=bf16 but the llmkit config has train.precision -> no"),
    ],
)
def test_accelerate_yaml_values_must_agree(tmp_path, monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(LlmkitError) as err:
        parallel.check_accelerate_env(_cfg(tmp_path), "fp32")
    assert message in str(err.value) and "Remove" in str(err.value)


def test_deepspeed_rejects_unfillable_auto_and_own_optimizer(tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2, "mystery": "auto"}}))
    cfg = _cfg(tmp_path)
    cfg = changed(cfg, {"deepspeed.config_file": str(ds_file)})
    with pytest.raises(LlmkitError, match="cannot fill: zero_optimization.mystery"):
        parallel.resolve_deepspeed(cfg, "fp32", world_size=1, hidden=32)
    ds_file.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(LlmkitError, match="has an 'optimizer' section"):
        parallel.resolve_deepspeed(cfg, "fp32", world_size=1, hidden=32)
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}))
    with pytest.raises(LlmkitError, match="stage3_gather_16bit_weights_on_model_save is false"):
        parallel.resolve_deepspeed(cfg, "fp32", world_size=1, hidden=32)


def test_output_dir_of_another_run_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    cfg = changed(cfg, {"output.output_dir": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(LlmkitError, match="already holds files from another run"):
        preflight.check_output_dir(cfg)
    cfg = changed(cfg, {"output.overwrite_output_dir": True})
    with pytest.raises(LlmkitError, match="holds files llmkit did not write"):
        preflight.check_output_dir(cfg)  # overwrite replaces an llmkit run only
    (tmp_path / "run" / ".llmkit-run").write_text("{}")
    assert preflight.check_output_dir(cfg) == (RunDir(tmp_path / "run"), "overwrite")


def test_data_config_defaults_are_sane():
    d = DataConfig()
    assert d.validation_split == "validation" and d.max_length == 128 and d.clean_text is False


def _fields(cls, prefix):
    import dataclasses

    for f in dataclasses.fields(cls):
        yield f"{prefix}.{f.name}", f


def test_llmkit_config_lists_every_key_of_the_schema():
    """`llmkit config` against the dataclasses themselves: every field once, its type and default, a meaning."""
    import dataclasses

    from llmkit.config import docs, schema

    want = {}
    for section, cls in schema.sections():
        want.update(_fields(cls, section))
    want.update(_fields(schema.MixtureSource, "data.mixture[]"))
    listed = {k.name: k for k in docs.keys()}
    assert list(listed) == list(want) and len(listed) > 90
    for name, f in want.items():
        key = listed[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert key.default == default, name
        assert len(key.meaning) > 8 and key.meaning == f.metadata["help"], f"{name} has no meaning in the schema"
        assert key.readers and set(key.readers) <= set(schema.READERS), name
    text = docs.listing()
    assert "  train.report_to: list[str] | str = [tensorboard]\n      experiment trackers" in text
    assert "  data.mixture[].weight: float = (required)\n      the share of training examples" in text
    # the allowed values come from the schema's Literal types, and who reads a key is said
    assert "  train.precision: one of auto, fp32, bf16, fp16 = auto\n" in text
    assert "  deepspeed.zero_stage: one of 0, 1, 2, 3 | None = null\n" in text
    assert ("  output.explain_rows: int = 8\n      report rows explained word by word (mistakes first); 0: none\n"
            "      read only by recipes/classification.py or recipes/causal_lm.py with data.prompt_template\n") in text


@pytest.mark.parametrize("recipe", ["classification", "causal_lm"])
def test_a_starter_config_validates_as_written(tmp_path, recipe, capsys):
    from llmkit.commands.validate import validate
    from llmkit.config import docs

    path = tmp_path / "starter.yaml"
    docs.write(str(path), recipe)
    text = path.read_text()
    assert "  # peak AdamW learning rate\n  learning_rate: 5.0e-05\n" in text
    assert ("sample_prompts" in text) == (recipe == "causal_lm")  # only the keys the recipe reads
    validate(str(path), [f"--output.output_dir={tmp_path / 'out'}"], None, recipe)
    assert capsys.readouterr().out.rstrip().endswith("all checks passed")
    with pytest.raises(LlmkitError, match="already exists: llmkit config --write does not overwrite"):
        docs.write(str(path), recipe)


def test_the_loaded_config_is_frozen(tmp_path):
    """What a launch decides later (an elastic resume's accumulation, a trained tokenizer) is the run's, recorded
    beside the config; the config itself is what the user gave."""
    import dataclasses

    cfg = load_config(_yaml(tmp_path, BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.gradient_accumulation_steps = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = None


def test_a_key_renamed_since_an_earlier_llmkit_names_its_new_name(tmp_path):
    """data.eval_split is data.validation_split now (the split's role everywhere else): in the YAML, in an
    override and in a mixture source, one line names the new key."""
    path = _yaml(tmp_path, {**BASE, "data": {**BASE["data"], "eval_split": "dev"}})
    with pytest.raises(LlmkitError, match=r"^config key 'data.eval_split' is now 'data.validation_split'; rename"):
        load_config(path)
    with pytest.raises(LlmkitError, match=r"'data.eval_split' is now 'data.validation_split'"):
        load_config(_yaml(tmp_path, BASE), ["--data.eval_split", "dev"])
    mixture = {"mixture": [{"weight": 1, "dataset": "a", "eval_split": "dev"}, {"weight": 1, "dataset": "b"}]}
    with pytest.raises(LlmkitError, match=r"'data.mixture\[0\].eval_split' is now 'data.mixture\[0\].validation_split'"):
        load_config(_yaml(tmp_path, {**BASE, "data": mixture}))
    assert load_config(_yaml(tmp_path, BASE), ["--data.validation_split", "dev"]).data.validation_split == "dev"
