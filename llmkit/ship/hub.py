"""Publish a run to the Hugging Face Hub: stage exactly what is uploaded, verify it, write the model card, push it
in one commit with retries. The token comes from huggingface_hub's usual places and is never written anywhere."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from llmkit import assets, compression, model
from llmkit.config.checks import check_hub_token as token
from llmkit.config.checks import check_repo_id, check_revision
from llmkit.errors import LlmkitError
from llmkit.exported.opened import CLASSIFIER, is_export, open_export
from llmkit.rundir import outputs
from llmkit.rundir.layout import ADAPTER_CONFIG, MERGED, PROBE, REPORT_KINDS, Export, RunDir, read_json
from llmkit.ship import card, verify

RETRIES = 4  # after the first try; waits 1, 2, 4, 8 s
INTERNAL = {PROBE}  # kept locally, not uploaded
TEXT = (".json", ".yaml", ".yml", ".md", ".html", ".txt", ".jinja")  # staged files scrubbed of local paths


# ------------------------------------------------------------------------------------------------ staging


def _final_dir(path: str | Path | RunDir) -> tuple[RunDir, Path]:
    """(the run, its export dir) from a run (the RunDir a run hands on, or its output dir) or its final/ folder."""
    run = path if isinstance(path, RunDir) else RunDir(Path(path).expanduser())
    path = run.root
    if run.final.root.is_dir():
        return run, run.final.root
    if is_export(path):
        return RunDir(path.parent), path
    raise LlmkitError(f"'{path}' is neither a run directory with final/ nor an exported model folder")


def _kind(final: Path) -> str:
    """How the export is pushed: classification (a LoRA classifier: the merged model, with its adapter in
    adapter/), causal_lm, or lora (a causal LM's adapter, with merged/); what it is, the export's owner says."""
    opened = open_export(final)
    if opened.kind == CLASSIFIER:
        return "classification"
    return "lora" if opened.adapter is not None else "causal_lm"


def _name_base_by_hub_id(adapter_dir: Path, probe: dict | None) -> None:
    """The adapter's base_model_name_or_path as a Hub id when the base has one (the local path means nothing
    on the Hub)."""
    path = adapter_dir / ADAPTER_CONFIG
    adapter_cfg = json.loads(path.read_text())
    hub_base = assets.hub_id(probe["base"] if probe else adapter_cfg.get("base_model_name_or_path"))
    if hub_base:
        adapter_cfg["base_model_name_or_path"] = hub_base
        path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")


def _copy_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in INTERNAL:
            shutil.copy2(f, dst / f.name)


def stage(run_dir: str | Path | RunDir, out: Path, repo_id: str, push_merged: bool = False, reload: bool = True,
          remember: bool = True, overwrite: bool = False) -> dict:
    """Write `out`: exactly the folder that is uploaded, verified: no size-0 tensors, and (`reload`) the
    weights reload and reproduce the run's logits; model card included. Returns facts for the caller (kind,
    files). `reload=False` is for the push at the end of a run: its export was reload-checked moments ago, and
    the check's result (final/metrics.json "export_check") is reported instead. `remember` records `out` in the
    run dir as a folder a later dry run may replace with `overwrite` (a real push stages into a fresh temporary
    folder). The folder is built beside `out` and swapped in whole once verified (llmkit.rundir.outputs)."""
    run, final = _final_dir(run_dir)
    model.check_export_weights(final)
    _refuse_links(run, final)
    out = Path(out)
    _check_staging(out, run, final, overwrite)
    with outputs.replaced(out) as build:
        facts = _fill(build, run, final, repo_id, push_merged, reload)
    if remember:
        _remember(out, run)
    return {**facts, "files": listing(out)}


def _fill(out: Path, run: RunDir, final: Path, repo_id: str, push_merged: bool, reload: bool) -> dict:
    """The staged folder's files, checked; the facts of `stage`."""
    kind, export = _kind(final), Export(final)
    probe = read_json(export.probe) or None
    if kind == "lora":
        # the adapter at the repo root (so PeftModel / AutoPeftModel load the repo), its base named by Hub id
        _copy_files(export.adapter, out)
        _copy_files(final, out)
        if push_merged:
            _copy_files(export.merged, out / export.merged.name)
        _name_base_by_hub_id(out, probe)
    else:
        _copy_files(final, out)
        if export.adapter.is_dir():  # a LoRA classifier: the merged model at the root, its adapter beside
            _copy_files(export.adapter, out / export.adapter.name)
            _name_base_by_hub_id(out / export.adapter.name, probe)
    for copy in compression.copies(final):  # each quantized copy in a folder named by its format
        _copy_files(copy["folder"], out / copy["format"])
    for report in (run.report(k) for k in REPORT_KINDS):
        if report.is_file():
            shutil.copy2(report, out / report.name)
    verify.check_weights(out)
    if probe is None:
        raise LlmkitError(f"{final} has no {PROBE} (exported by an older llmkit?): it cannot be checked "
                          "against the run; export it again")
    if not reload:
        checked = {"export": export.read_metrics().get("export_check")}
    elif kind == "classification":
        checked = {"model": verify.check_classifier(out, probe)}
    elif kind == "causal_lm":
        checked = {"model": verify.check_causal_lm(out, probe)}
    else:  # the adapter on its (local) base, and the merged copy when it goes up too
        checked = {"adapter": verify.check_causal_lm(out, probe)}
        if push_merged:
            checked[MERGED] = verify.check_causal_lm(out / export.merged.name, {**probe, "lora": False})
    (out / "README.md").write_text(card.build(run, final, kind, repo_id, push_merged))
    cfg = export.read_config()
    scrub_local_paths(out, local_paths(run, cfg, probe))
    return {"kind": kind, "checked": checked}


def _refuse_links(run: RunDir, final: Path) -> None:
    """Nothing uploaded is a symbolic link: a link can point at any file (a key, a secret) and would be followed."""
    links = [p for p in sorted(final.rglob("*")) if p.is_symlink()]
    links += [p for p in (run.report(kind) for kind in REPORT_KINDS) if p.is_symlink()]
    if links:
        raise LlmkitError(f"{links[0]} is a symbolic link; llmkit pushes no links (one can point at any file, a "
                          "secret say, and its target would go up). Replace it with a copy of the file, or remove it.")


def local_paths(run: RunDir, cfg: dict, probe: dict | None) -> list[str]:
    """The absolute local paths a run's text files can hold: the run itself, the home and working folders, and
    every path its config (as a dict) names (model, tokenizer, data, DeepSpeed JSON, output, resume), longest
    first."""
    section = lambda name: cfg.get(name) or {}  # noqa: E731
    named = [section("model").get("name_or_path"), section("model").get("tokenizer"), section("data").get("dataset"),
             *(section("data").get("data_files") or {}).values(), section("deepspeed").get("config_file"),
             section("output").get("output_dir"), section("checkpoint").get("resume_from"),
             (probe or {}).get("base")]
    found = {str(run.root), str(run.root.resolve()), str(Path.home()), str(Path.cwd())}
    for value in named:
        if isinstance(value, str) and value and not value.startswith("asset:"):
            path = Path(value).expanduser()
            found |= {str(path), str(path.resolve())} if path.is_absolute() or path.exists() else set()
    return sorted((p for p in found if Path(p).is_absolute() and p != "/"), key=len, reverse=True)


def scrub_local_paths(out: Path, paths: list[str]) -> None:
    """Each local path in the staged text files becomes <local>/<its last part>: the Hub gets no map of this
    machine (user names, folder layout)."""
    for file in sorted(out.rglob("*")):
        if not file.is_file() or file.suffix not in TEXT:
            continue
        text = file.read_text(errors="replace")
        scrubbed = text
        for path in paths:
            scrubbed = scrubbed.replace(path, f"<local>/{Path(path).name}")
        if scrubbed != text:
            file.write_text(scrubbed)


def _staged(run: RunDir) -> list[str]:
    """The folders dry runs of this run made (a staging folder carries no marker: it is exactly the upload)."""
    record = run.hub_staged
    return json.loads(record.read_text()) if record.is_file() else []


def _check_staging(out: Path, run: RunDir, final: Path, overwrite: bool) -> None:
    """Only a new or empty folder, or with `overwrite` one an earlier dry run of this run made: never the run, a
    folder holding it, or its export."""
    where, folder, export = out.resolve(), run.root.resolve(), final.resolve()
    if where in (folder, export) or export in where.parents or where in folder.parents:
        raise LlmkitError(f"the staging folder {out} is the run, holds it or lies inside its export; pick a folder "
                          f"outside {export} (the default is {run.hub_upload})")
    outputs.check(out, "llmkit push --dry-run", str(where) in _staged(run), ("*",), overwrite,
                  "the staging folder")


def _remember(out: Path, run: RunDir) -> None:
    made, where = _staged(run), str(out.resolve())
    if where not in made:
        run.hub_staged.write_text(json.dumps([*made, where], indent=1) + "\n")


def listing(folder: Path) -> list[tuple[str, int]]:
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def show(files: list[tuple[str, int]]) -> str:
    total = sum(size for _, size in files)
    lines = [f"{size:>14,d}  {name}" for name, size in files]
    return "\n".join([*lines, f"{total:>14,d}  total, {len(files)} files"])


# -------------------------------------------------------------------------------------------------- pushing


def _status(exc: BaseException | None) -> int | None:
    """The HTTP status behind an error, looking through the chain (the client wraps e.g. an LFS 413)."""
    seen = 0
    while exc is not None and seen < 5:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None:
            return status
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _explain(exc: Exception, endpoint: str, repo_id: str) -> str:
    status = _status(exc)
    if status == 401:
        return "the Hub rejected the token (401): check HF_TOKEN or run `hf auth login` again"
    if status == 403:
        return f"the token may not write to {repo_id} (403): use a write token, or a namespace you own"
    if status == 413:
        return "the Hub refused an upload as too large (413): a single file over the Hub's limit?"
    if status is not None:
        return f"the Hub answered HTTP {status}: {str(exc).splitlines()[0][:300]}"
    return f"could not reach {endpoint}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _retryable(exc: Exception) -> bool:
    status = _status(exc)
    if status is None:  # connection refused / reset / timeout
        name = type(exc).__name__.lower()
        return isinstance(exc, OSError) or "connect" in name or "timeout" in name
    return status >= 500 or status == 429


def with_retries(fn, what: str, endpoint: str, repo_id: str, log=print, sleep=time.sleep):
    """Call fn(); retry network errors, 429 and 5xx with exponential backoff, then fail with a clear message."""
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except Exception as exc:  # the client raises several types; sorted out by status code
            if attempt < RETRIES and _retryable(exc):
                wait = 2 ** attempt
                log(f"hub: {what} failed ({_explain(exc, endpoint, repo_id)}); retrying in {wait} s")
                sleep(wait)
                continue
            tries = f" after {attempt + 1} tries" if attempt else ""
            raise LlmkitError(f"pushing to {repo_id} failed{tries}: {_explain(exc, endpoint, repo_id)}. Nothing "
                              "local was changed; push again with `llmkit push`.") from None


def _api():
    from huggingface_hub import HfApi, constants

    return HfApi(token=token()), constants.ENDPOINT


def upload(folder: Path, repo_id: str, private: bool, revision: str | None, message: str, path_in_repo: str = "",
           log=print) -> str:
    """Create the repo (and branch) if needed and upload `folder` as ONE commit. Returns the commit URL."""
    api, endpoint = _api()
    with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "create_repo", endpoint, repo_id,
                 log)
    info = with_retries(lambda: api.repo_info(repo_id), "repo_info", endpoint, repo_id, log)
    if private and getattr(info, "private", None) is False:
        raise LlmkitError(f"{repo_id} already exists and is public, but this push asks for a private repo "
                          "(output.hub_private is true, the default); nothing was pushed. Push with --public "
                          "(output.hub_private: false) to publish into it, or make the repo private on the Hub first.")
    if revision:
        with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), "create_branch", endpoint,
                     repo_id, log)
    info = with_retries(lambda: api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                                  path_in_repo=path_in_repo or None, commit_message=message),
                        "upload", endpoint, repo_id, log)
    return str(getattr(info, "commit_url", info))


def push(run_dir: str | Path | RunDir, repo_id: str, private: bool = True, revision: str | None = None,
         push_merged: bool = False, dry_run: bool = False, staging: str | Path | None = None, log=print,
         reload: bool = True, overwrite: bool = False) -> dict:
    """Stage, verify and push a run (or print what would be pushed; `overwrite` replaces an earlier dry run's
    folder whole). Local files are never modified."""
    check_repo_id(repo_id, "repo_id")
    check_revision(revision, "--revision")
    run, _ = _final_dir(run_dir)
    if dry_run:
        out = Path(staging) if staging else run.hub_upload
        facts = stage(run, out, repo_id, push_merged, reload, overwrite=overwrite)
        log(f"dry run: {out} is exactly what would be uploaded to {repo_id}:\n{show(facts['files'])}")
        return {**facts, "folder": str(out)}
    token()  # fail before any work when there is no token
    with tempfile.TemporaryDirectory(dir=run.root, prefix=RunDir.HUB_STAGING_PREFIX) as tmp:
        facts = stage(run, Path(tmp) / "upload", repo_id, push_merged, reload, remember=False)
        url = upload(Path(tmp) / "upload", repo_id, private, revision, f"llmkit: {facts['kind']} model", log=log)
    log(f"pushed {len(facts['files'])} files to {repo_id}: {url}")
    return {**facts, "commit_url": url}


def push_run(run, uploader=None) -> str | None:
    """End of a run with output.push_to_hub: wait for the every_save uploads (`uploader`), then push final/ (rank 0; the
    others wait). A stop signal that arrived after the last training step skips the push: returns what was
    skipped and how to do it, for Run.finish."""
    o = run.cfg.output
    if not o.push_to_hub:
        return None
    signal = run.stopped()
    if signal:
        run.log(f"hub: {signal} arrived after the last training step; the push is skipped")
        return f"the push was skipped: push it with `llmkit push {run.dir.root} {o.hub_model_id}`"
    if run.accelerator.is_main_process:
        if uploader is not None:
            for err in uploader.wait():
                run.log(f"hub: an every_save upload failed: {err}")
        push(run.dir, o.hub_model_id, o.hub_private, o.hub_revision, o.hub_push_merged, log=run.log,
             reload=False)
    run.accelerator.wait_for_everyone()
    return None
