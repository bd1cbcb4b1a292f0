"""Who reads each config key (llmkit.config.schema's `readers`): every key against every reader, as the preflight
refuses it, and real runs of each recipe, whose reads must stay inside what the schema says they read."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
import typing

import pytest
from helpers import ROOT, build_tiny_lm, changed, write_config, write_lm_config

from llmkit.config import Config, MixtureSource, load_config, schema
from llmkit.errors import LlmkitError
from llmkit.launch.preflight import check_recipe_keys

RUNS = {"classification": "classification", "causal_lm": "causal_lm", "label_words": "causal_lm"}


def _other_value(tp, default):
    """A value of type `tp` that is not `default`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return next(a for a in args if a != default)
    if origin in (typing.Union, types.UnionType):
        return _other_value(next(a for a in args if a is not type(None)), default)
    if origin is list:
        if args[0] is MixtureSource:
            return [MixtureSource(weight=1.0, dataset="a"), MixtureSource(weight=1.0, dataset="b")]
        return [_other_value(args[0], None)] * 2
    if origin is dict:
        return {"train": "train.jsonl"}
    if tp is bool:
        return not default
    if tp in (int, float):
        return tp((default or 0) + 1)
    return f"{default}-other"


def _keys():
    for section, cls in schema.sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield section, f, hints[f.name]


@pytest.mark.parametrize("reader", schema.READERS)
def test_every_key_set_for_a_run_that_does_not_read_it_is_refused(reader):
    """The walk over the schema: a key away from its default passes where its reader runs, and is refused, naming
    the key and who reads it, everywhere else."""
    base = changed(Config(), {"data.prompt_template": "is this {text}"}) if reader == "label_words" else Config()
    refused = []
    for section, f, tp in _keys():
        name = f"{section}.{f.name}"
        if name == "data.prompt_template":  # the key that decides the reader (set: label words)
            continue
        value = _other_value(tp, getattr(getattr(base, section), f.name))
        cfg = changed(base, {name: value})
        try:
            check_recipe_keys(cfg, RUNS[reader])
        except LlmkitError as exc:
            assert str(exc).startswith(f"{name} is set, but "), exc
            assert schema.who_reads(f.metadata["readers"]) in str(exc)
            refused.append(name)
        else:
            assert reader in f.metadata["readers"] or not value, f"{name} is set in a {reader} run, which does not read it"
        if reader not in f.metadata["readers"]:  # the same key turned off (0, false, null) asks nothing: passes
            default = getattr(getattr(base, section), f.name)
            off = False if isinstance(default, bool) else 0 if isinstance(default, (int, float)) else None
            check_recipe_keys(changed(base, {name: off}), RUNS[reader])
    expected = {f"{s}.{f.name}" for s, f, _ in _keys() if reader not in f.metadata["readers"]}
    assert set(refused) == expected - {"data.prompt_template"}
    # the classes the issue named: classifier keys in a causal-LM run without label words
    if reader == "causal_lm":
        assert {"output.explain_rows", "data.text_pair_column", "data.label_column", "train.class_weights"} <= expected
    if reader == "classification":
        assert {"data.format", "data.packing", "train.sample_prompts"} <= expected


def _recording(cfg: Config, seen: set) -> Config:
    """`cfg` whose sections note each key a run reads: reads by dataclasses' own copying (replace, asdict), by the
    config package (dump) and by the preflight's walk over every key are not a run using the key."""
    def section(obj, name: str):
        cls, fields = type(obj), {f.name for f in dataclasses.fields(obj)}

        def get(self, attr):
            if attr in fields:
                code = sys._getframe(1).f_code
                if not (code.co_filename.endswith("dataclasses.py") or "/llmkit/config/" in code.co_filename
                        or code.co_name == "check_recipe_keys"):
                    seen.add(f"{name}.{attr}")
            return object.__getattribute__(self, attr)

        recording = type(cls.__name__, (cls,), {"__getattribute__": get})
        return recording(**{f: object.__getattribute__(obj, f) for f in fields})

    return dataclasses.replace(cfg, **{name: section(getattr(cfg, name), name) for name, _ in schema.sections()})


@pytest.mark.slow
@pytest.mark.parametrize("reader", schema.READERS)
def test_a_run_reads_only_the_keys_the_schema_gives_its_recipe(tmp_path, monkeypatch, tiny_bert, tiny_data, reader):
    """A whole run in this process (one rank, no launcher; the export check and explanations in their fresh
    processes): every key it reads is one the schema says it reads, so a key refused there is truly unread."""
    if reader == "classification":
        cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out", max_steps=1,
                           explain_rows=1, verify_export=True)
        overrides = []
    else:
        lm = build_tiny_lm(tmp_path / "lm")
        if reader == "label_words":
            rows = [{"text": t, "label": lab} for t, lab in (("film good", "positive"), ("film bad", "negative"))]
            for split in ("train", "validation"):
                (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
            cfg = write_config(tmp_path / "c.yaml", lm / "model", tmp_path, tmp_path / "out", max_steps=1,
                               explain_rows=1, per_device_batch_size=4)
            overrides = ["--data.prompt_template", "is this {text}", "--data.test_split", "null",
                         "--train.sample_prompts", "[is this]", "--train.sample_max_new_tokens", "2"]
        else:  # prompt/response rows, the keys it reads only: no output.explain_rows
            cfg = write_lm_config(tmp_path / "c.yaml", lm, tmp_path / "out", lora=False, max_steps=1)
            overrides = ["--data.prompt_column", "prompt", "--data.response_column", "response",
                         "--train.sample_prompts", "[is this]", "--output.verify_export", "true"]
    seen: set[str] = set()
    loaded = _recording(load_config(cfg, overrides), seen)
    spec = importlib.util.spec_from_file_location(f"recipe_{reader}", ROOT / "recipes" / f"{RUNS[reader]}.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setattr(recipe, "load_config", lambda *args: loaded)
    monkeypatch.setattr(recipe, "recipe_args", lambda: (None, []))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    recipe.main()
    assert (tmp_path / "out" / "final").is_dir()
    readers = {f"{s}.{f.name}": f.metadata["readers"] for s, f, _ in _keys()}
    unread = sorted(k for k in seen if reader not in readers[k])
    assert not unread, f"a {reader} run read {unread}, which the schema says it does not"
    assert {"train.learning_rate", "data.max_length", "output.output_dir"} <= seen  # the recording sees reads
    if reader != "causal_lm":
        assert "output.explain_rows" in seen
