"""Pushing to the Hub, against a local stand-in of the Hub's HTTP API (tests/fake_hub.py) and the real
huggingface_hub client: one commit with exactly the exported bytes, the token only in the Authorization
header and nowhere on disk or in logs, a model card whose model-index equals metrics.json, clear failures that
leave the local export untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub
from helpers import LAUNCH_ENV, check_ok, fake_run, launch, write_config, write_lm_config
from lm_runs import check_causal_lm_run

from llmkit.config.checks import check_repo_id
from llmkit.errors import LlmkitError
from llmkit.rundir.layout import RunDir
from llmkit.ship import hub, verify

CANARY = "hf_llmkitCanaryToken0123456789abcdefXYZ"  # a made-up token that must never be written anywhere
# the stand-in speaks the classic LFS upload protocol; the client would pick Xet storage (the real Hub's) otherwise
HUB_ENV = {"HF_TOKEN": CANARY, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _tree(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_canary(folder, *logs: str) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            assert CANARY.encode() not in p.read_bytes(), p
    for text in logs:
        assert CANARY not in text


@pytest.fixture(scope="module")
def fake_hub():
    with FakeHub(token=CANARY) as server:
        yield server


@pytest.fixture(scope="module")
def pushed_classifier(tmp_path_factory, tiny_bert, tiny_data, fake_hub):
    """A 2-rank ZeRO-3 run that pushes itself: every checkpoint in the background, then the final export."""
    root = tmp_path_factory.mktemp("hub_cls")
    out = root / "run"
    cfg = write_config(root / "c.yaml", tiny_bert, tiny_data, out, epochs=1)
    raw = yaml.safe_load(cfg.read_text())
    raw["checkpoint"] = {"save_every_steps": 3, "keep_last": 1}
    raw["output"].update(push_to_hub=True, hub_model_id="alice/tiny-sentiment", hub_strategy="every_save")
    cfg.write_text(yaml.safe_dump(raw))
    env = {"HF_ENDPOINT": fake_hub.url, **HUB_ENV}
    proc = launch("recipes/classification.py", ["--config", str(cfg)], "cpu_zero3.yaml", env=env)
    check_ok(proc)
    return out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_run_pushes_its_export_in_one_commit_byte_for_byte(pushed_classifier, fake_hub):
    out, log = pushed_classifier
    commits = fake_hub.commits("alice/tiny-sentiment")
    # a commit of the weights after each save (steps 3 and 6), then the export: one commit with everything
    assert [c["message"] for c in commits] == ["llmkit: training in progress, step-3",
                                               "llmkit: training in progress, step-6", "llmkit: classification model"]
    # the client skips files the repo already holds byte for byte (the last save's weights): read the tree
    added = fake_hub.files("alice/tiny-sentiment")
    final = out / "final"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        assert added[name] == (final / name).read_bytes(), name
    # the files that name local paths go up with each path as <local>/<last part>, otherwise the same
    local = yaml.safe_load((final / "training_config.yaml").read_text())
    pushed = yaml.safe_load(added["training_config.yaml"])
    assert pushed["train"] == local["train"] and pushed["lora"] == local["lora"]
    for section, key in (("model", "name_or_path"), ("data", "dataset"), ("output", "output_dir")):
        assert pushed[section][key] == f"<local>/{Path(local[section][key]).name}", (section, key)
    report = json.loads(added["report.json"])
    assert report["runs"][0]["splits"] == json.loads((out / "report.json").read_text())["runs"][0]["splits"]
    basetemp = str(out.parent.parent)  # the folder holding this run, its model and its data
    for name, data in added.items():
        if name.endswith((".json", ".yaml", ".md", ".html")):
            assert basetemp not in data.decode(errors="replace"), name
    assert "README.md" in added and "llmkit_probe.json" not in added
    assert not any(n.startswith("checkpoints/") for n in added)
    # the repo holds one model, at its root: no checkpoint folders, no optimizer state
    tree = fake_hub.files("alice/tiny-sentiment")
    assert not any("/" in name for name in tree), sorted(tree)
    assert tree["model.safetensors"] == (final / "model.safetensors").read_bytes()
    assert fake_hub.unexpected == []
    # the token: only ever in the Authorization header, never on disk or in the logs
    assert fake_hub.token_leaks() == []
    _no_canary(out, log)
    assert f"pushed {len(added)} files to alice/tiny-sentiment" in log


@pytest.mark.slow
def test_every_save_pushes_loadable_weights_only(pushed_classifier, fake_hub, tmp_path):
    """hub_strategy every_save, the Trainer's way: each save commits the gathered (ZeRO-3) weights, config and
    tokenizer at the root, overwriting the previous ones; nothing of DeepSpeed's checkpoint goes up."""
    import torch
    from transformers import AutoModelForSequenceClassification

    out, _ = pushed_classifier
    saves = fake_hub.commits("alice/tiny-sentiment")[:2]
    weights = []
    for commit in saves:
        tree = fake_hub.files("alice/tiny-sentiment", commit["oid"])  # the repo as this save left it
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(tree), sorted(tree)
        assert "model.safetensors" in commit["added"]
        assert not any("/" in n or n.endswith((".pt", ".bin")) or "optim" in n for n in tree), sorted(tree)
        folder = tmp_path / commit["message"].rsplit(" ", 1)[-1]
        folder.mkdir()
        for name, data in tree.items():
            (folder / name).write_bytes(data)
        net = AutoModelForSequenceClassification.from_pretrained(folder)
        labels = json.loads((out / "final" / "config.json").read_text())["id2label"]
        assert net.config.id2label == {int(k): v for k, v in labels.items()}
        with torch.no_grad():
            assert torch.isfinite(net(input_ids=torch.tensor([[2, 5, 6, 3]])).logits).all()
        weights.append(tree["model.safetensors"])
        assert str(out.parent.parent) not in tree["config.json"].decode()
    assert weights[0] != weights[1]  # the second save replaced the first one's weights
    assert not (out / ".hub-snapshots").exists()


@pytest.mark.slow
def test_card_model_index_equals_metrics(pushed_classifier, fake_hub, tmp_path):
    from huggingface_hub import ModelCard

    out, _ = pushed_classifier
    readme = fake_hub.files("alice/tiny-sentiment")["README.md"]
    (tmp_path / "README.md").write_bytes(readme)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert {"llmkit", "deepspeed", "zero-3"} <= set(data.tags)
    assert data.license and data.model_name == "tiny-sentiment"
    metrics = json.loads((out / "metrics.json").read_text())
    got = {(r.dataset_split, r.metric_name): r.metric_value for r in data.eval_results}
    named = {"accuracy": "accuracy", "f1": "F1 (positive: pos)", "f1_macro": "F1 (macro)",
             "precision": "precision (positive: pos)", "recall": "recall (positive: pos)"}
    want = {(split, named[name]): metrics[split][name] for split in ("test", "validation") for name in named}
    assert got == pytest.approx(want)
    text = card.text
    assert 'pipeline("text-classification", model="alice/tiny-sentiment")' in text
    assert "## Limitations" in text and "DeepSpeed ZeRO stage | 3" in text


@pytest.mark.slow
def test_lora_push_has_adapter_at_root_and_merged_model(tmp_path, tiny_lm, fake_hub):
    out = tmp_path / "run"
    cfg = write_lm_config(tmp_path / "c.yaml", tiny_lm, out, lora=True, epochs=2, logging_steps=1)
    raw = yaml.safe_load(cfg.read_text())  # every_save too: the adapter, gathered from ZeRO-3, after each save
    raw["checkpoint"] = {"save_every_steps": 2, "keep_last": 1}
    raw["lora"]["dropout"] = 0.1  # the dropout inside each adapter's A (llmkit.model.lora) on ZeRO-3's partitions
    raw["output"].update(push_to_hub=True, hub_model_id="bob/tiny-lora", hub_strategy="every_save")
    cfg.write_text(yaml.safe_dump(raw))
    env = {**LAUNCH_ENV, "HF_ENDPOINT": fake_hub.url, **HUB_ENV}
    proc = launch("recipes/causal_lm.py", ["--config", str(cfg)], "cpu_zero3.yaml", env=env)
    check_ok(proc)
    check_causal_lm_run(proc, cfg, out, tiny_lm, lora=True)  # the recipe's own checks: ZeRO-3 LoRA trains and exports
    saves = [c for c in fake_hub.commits("bob/tiny-lora") if "training in progress" in c["message"]]
    trees = [fake_hub.files("bob/tiny-lora", c["oid"]) for c in saves]
    assert saves and all("adapter_model.safetensors" in c["added"] for c in saves)
    assert all(set(t) >= {"adapter_model.safetensors", "adapter_config.json"} for t in trees)
    assert not any("/" in n for t in trees for n in t)  # no checkpoint folders, no optimizer state
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name, data in trees[-1].items():
        (snapshot / name).write_bytes(data)
    assert json.loads((snapshot / "adapter_config.json").read_text())["base_model_name_or_path"] == "<local>/model"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm / "model"), snapshot)
    before = _tree(out)
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "push", str(out), "bob/tiny-lora", "--merged",
                           "--revision", "v1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tree(out) == before  # pushing changes nothing local
    assert len([c for c in fake_hub.commits("bob/tiny-lora") if c["revision"] == "v1"]) == 1
    added = fake_hub.files("bob/tiny-lora", "v1")  # the branch starts from main: unchanged files are not re-sent
    final = out / "final"
    for name in ("adapter_model.safetensors", "tokenizer.json"):
        assert added[name] == (final / "adapter" / name).read_bytes(), name
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    base = adapter.pop("base_model_name_or_path")
    pushed = json.loads(added["adapter_config.json"])
    assert pushed.pop("base_model_name_or_path") == f"<local>/{Path(base).name}" and pushed == adapter
    assert added["merged/model.safetensors"] == (final / "merged" / "model.safetensors").read_bytes()
    assert added["merged/config.json"] == (final / "merged" / "config.json").read_bytes()
    readme = added["README.md"].decode()
    assert "library_name: peft" in readme and "lora" in readme and 'subfolder="merged"' in readme
    assert fake_hub.token_leaks() == [] and fake_hub.unexpected == []
    _no_canary(out, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_dry_run_writes_the_exact_folder_without_network(pushed_classifier, tmp_path, monkeypatch):
    out, _ = pushed_classifier
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no_login"))  # no stored token either
    env = {**LAUNCH_ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "no_login")}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "push", str(out), "alice/x", "--dry-run", "--output",
                           str(tmp_path / "up")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    staged = tmp_path / "up"
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert "model.safetensors" in files and "README.md" in files and "report.html" in files
    for name in files:  # every file listed, with its size
        assert f"{(staged / name).stat().st_size:,d}  {name}" in proc.stdout
    assert (staged / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["down", "401", "5xx_then_ok", "413"])
def test_push_failures_are_clear_and_keep_local_files(pushed_classifier, tmp_path, monkeypatch, fault):
    from huggingface_hub import constants

    out, _ = pushed_classifier
    before = _tree(out)
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)  # no real backoff waits in a test
    monkeypatch.setenv("HF_TOKEN", CANARY)
    said = []
    with FakeHub(token=CANARY) as server:
        url = server.url
        if fault == "401":
            server.fail_auth = True
        elif fault == "5xx_then_ok":
            server.fail_5xx = 2
        elif fault == "413":
            server.fail_413 = True
        if fault == "down":
            server.stop()
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        if fault == "5xx_then_ok":
            hub.push(out, "carol/retry", log=said.append)
            assert len(server.commits("carol/retry")) == 1
            assert any("retrying in" in s for s in said)
        else:
            expected = {"down": "could not reach", "401": "rejected the token \\(401\\)",
                        "413": "too large \\(413\\)"}[fault]
            with pytest.raises(LlmkitError, match=expected) as err:
                hub.push(out, "carol/fail", log=said.append)
            assert "Nothing local was changed" in str(err.value)
            assert CANARY not in str(err.value)
    assert _tree(out) == before
    assert not any(p.name.startswith(".hub-") for p in out.iterdir())  # the staging folder is gone
    assert all(CANARY not in s for s in said)


@pytest.mark.slow
def test_push_refuses_empty_weights_and_bad_ids(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(0, 4), "b": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(LlmkitError, match="1 size-0 tensors \\(e.g. w\\); refusing to push a partial model"):
        verify.check_weights(tmp_path)
    for bad in ("noslash", "a/b/c", "", "a/../b", "-a/b"):
        with pytest.raises(LlmkitError, match="must look like <user or org>/<name>"):
            check_repo_id(bad)


@pytest.mark.slow
def test_push_refuses_links_and_a_public_repo_when_private_was_asked(pushed_classifier, tmp_path, monkeypatch):
    from huggingface_hub import constants

    out, _ = pushed_classifier
    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_not_for_the_hub")
    (copy / "final" / "notes.txt").symlink_to(secret)
    with pytest.raises(LlmkitError, match="notes.txt is a symbolic link; llmkit pushes no links"):
        hub.stage(copy, tmp_path / "up", "alice/x")
    assert not (tmp_path / "up").exists()
    (copy / "final" / "notes.txt").unlink()
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    with FakeHub(token=CANARY) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        hub.push(copy, "dave/shared", private=False, log=lambda m: None)  # someone made it public
        with pytest.raises(LlmkitError, match="dave/shared already exists and is public, but this push asks for "
                                              "a private repo .* nothing was pushed"):
            hub.push(copy, "dave/shared", log=lambda m: None)  # private is the default
        assert len(server.commits("dave/shared")) == 1


def test_dry_run_stages_only_into_folders_it_made(tmp_path):
    run = fake_run(tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    for target, message in ((run, "is the run"), (run / "final", "is the run"), (tmp_path, "is the run, holds it"),
                            (mine, "holds files `llmkit push --dry-run` did not write \\(keep.txt\\)")):
        with pytest.raises(LlmkitError, match=message):
            hub.stage(run, target, "alice/x")
    assert (mine / "keep.txt").read_text() == "precious" and (run / "final" / "config.json").is_file()
    assert (run / "notes.txt").read_text() == "mine"


def test_an_earlier_dry_run_is_replaced_only_when_asked_and_only_once_complete(tmp_path):
    """A dry run's folder again: refused without --overwrite; with it, a staging that fails (here: an export
    without weights) leaves the earlier folder as it was, with nothing beside it, and names it as the user does."""
    run = fake_run(tmp_path / "run")
    staged = tmp_path / "up"
    staged.mkdir()
    (staged / "README.md").write_text("the earlier dry run")
    RunDir(run).hub_staged.write_text(json.dumps([str(staged.resolve())]))  # as that dry run recorded it
    with pytest.raises(LlmkitError, match=r"^the staging folder .*up holds an earlier `llmkit push --dry-run` output; "
                                          "add --overwrite"):
        hub.push(run, "alice/x", dry_run=True, staging=staged)
    with pytest.raises(LlmkitError, match=f"^{staged} holds no .safetensors weights"):
        hub.push(run, "alice/x", dry_run=True, staging=staged, overwrite=True)
    assert [p.name for p in staged.iterdir()] == ["README.md"] and (staged / "README.md").read_text() == \
        "the earlier dry run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "up"]
