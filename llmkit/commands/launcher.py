"""`llmkit launch` and `llmkit train`: Accelerate's launcher, where the recipe, its config and the Accelerate and
DeepSpeed configs may be given by the names llmkit ships them under, from any folder; `llmkit recipes` lists
what ships. A run stopped by a user error exits 2 after its one `llmkit: error:` line."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from llmkit import logs, shipped
from llmkit.config.typed import read_yaml
from llmkit.errors import USER_ERROR


def launch_args(argv: list[str]) -> argparse.Namespace:
    """Accelerate's launch arguments with names resolved: the Accelerate config (--config_file) and the training
    script may be shipped names, and a relative deepspeed_config_file in the Accelerate config is read against that
    config and handed to the processes as an absolute path (Accelerate hands it on as written, so its processes
    would read it against the current folder)."""
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(argv)
    config = args.config_file and shipped.find(args.config_file, "accelerate", "Accelerate config (--config_file)")
    read = config or (Path(default_config_file) if os.path.isfile(default_config_file) else None)
    if read is not None and args.deepspeed_config_file is None:
        ds = shipped.accelerate_deepspeed_file(read_yaml(read, "Accelerate config"), read)
        if ds is not None:  # given first, as if typed: Accelerate then keeps it over the config's own
            args = parser.parse_args(["--deepspeed_config_file", str(ds), *argv])
    if config:
        args.config_file = str(config)
    if args.training_script and not (args.module or args.no_python):
        args.training_script = str(shipped.find(args.training_script, "recipe", "training script"))
    return args


def launch(argv: list[str]) -> None:
    """`llmkit launch ARGS`: `accelerate launch ARGS` (the same arguments, Accelerate's own launcher, names resolved
    as `launch_args` says), except that a run stopped by a user error exits 2 after its one `llmkit: error:` line,
    without the launcher's traceback or log lines. Accelerate's launcher re-raises every child failure
    (ChildFailedError, exit 1) and has no option to do otherwise; a failure that is not a user error (a bug, a
    crash, a signal) is re-raised here unchanged."""
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_args(argv)
    if not logs.verbose() and logs.cpu_only():  # DeepSpeed, imported here and in each rank, then says nothing
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # torch's launcher lines (its OMP_NUM_THREADS banner, each rank's exit) are kept back: said after a failure
    # that is not a user error, dropped after a user error's one line
    with logs.Held("torch.distributed") as held:
        try:
            launch_command(args)
        except ChildFailedError as exc:
            # a user error: some rank exited 2 with its llmkit line; every other failed rank exited 2 too (the same
            # error, reported once) or was stopped by the launcher's SIGTERM (a negative exit code is a signal)
            failures = exc.failures.values()
            said = any(f.exitcode == USER_ERROR and str(f.message).startswith("llmkit: error") for f in failures)
            if not said or any(f.exitcode not in (USER_ERROR, -signal.SIGTERM) for f in failures):
                raise
            held.drop()
            sys.exit(USER_ERROR)
        except subprocess.CalledProcessError as exc:  # one process: the child printed its line already
            if exc.returncode != USER_ERROR:
                raise
            held.drop()
            sys.exit(USER_ERROR)


def train(args: argparse.Namespace) -> None:
    """`llmkit train RECIPE --config C --accelerate-config A [--section.key value ...]`: `llmkit launch` of a shipped
    (or any) recipe, each file a path or a shipped name, checked before any process starts."""
    argv = []
    if args.accelerate_config:
        argv += ["--config_file", str(shipped.find(args.accelerate_config, "accelerate", "--accelerate-config"))]
    if args.num_processes:
        argv += ["--num_processes", str(args.num_processes)]
    if args.main_process_port:
        argv += ["--main_process_port", str(args.main_process_port)]
    argv.append(str(shipped.find(args.recipe, "recipe")))
    if args.config:
        argv += ["--config", str(shipped.find(args.config, "config", "--config"))]
    launch([*argv, *args.overrides])


def train_argv(args: argparse.Namespace, accelerate: Path) -> list[str]:
    """The `llmkit train` command line (in a fresh interpreter) of the run a command starts as configured: its
    recipe, config and Accelerate config, and the launcher options it was given (check-numerics, audit)."""
    cmd = [sys.executable, "-m", "llmkit.cli", "train", args.recipe, "--config", str(args.config),
           "--accelerate-config", str(accelerate)]
    if args.num_processes:
        cmd += ["--num-processes", str(args.num_processes)]
    if args.main_process_port:
        cmd += ["--main-process-port", str(args.main_process_port)]
    return cmd


HEADINGS = {
    "recipe": "recipes (llmkit train NAME)",
    "config": "recipe configs (--config NAME)",
    "accelerate": "Accelerate configs (--accelerate-config NAME; llmkit launch --config_file NAME)",
    "deepspeed": "DeepSpeed configs (deepspeed_config_file: NAME; --deepspeed.config_file NAME)",
}


def listing() -> str:
    """What ships with llmkit, kind by kind: each name with the first line it says about itself."""
    lines = [f"llmkit ships these (in {shipped.root()}); a path to your own file works wherever a name does"]
    for kind, heading in HEADINGS.items():
        lines += ["", f"{heading}:"]
        for name in shipped.names(kind):
            path = shipped.named(name, kind)
            lines.append(f"  {name:<34} {shipped.summary(path)}" if path else f"  {name}")
    return "\n".join(lines) + "\n"


def recipes(_: argparse.Namespace) -> None:
    """`llmkit recipes`: the listing of what ships."""
    print(listing(), end="")
