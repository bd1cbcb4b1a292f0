"""torch.profiler over a few training steps (train.profile_steps): per rank, an op table, a Chrome trace, and the
time of each phase of a step (the loop labels forward / backward / optimizer with record_function)."""

from __future__ import annotations

import json

import torch

PROFILE_WARMUP = 3  # steps before the profiled ones: the first steps allocate and warm caches
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def profiler(run):
    """A torch.profiler over train.profile_steps optimizer steps after a short warm-up (None when off); each rank
    writes its op table (by self time), a Chrome trace and the step's phases to <output_dir>/profile."""
    if not run.cfg.train.profile_steps:
        return None
    folder = run.dir.profile
    rank = run.accelerator.process_index
    gpu = torch.cuda.is_available()

    def write(prof) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        sort = "self_device_time_total" if gpu else "self_cpu_time_total"
        (folder / f"rank{rank}_ops.txt").write_text(events.table(sort_by=sort, row_limit=60) + "\n")
        prof.export_chrome_trace(str(folder / f"rank{rank}_trace.json"))
        (folder / f"rank{rank}_phases.json").write_text(json.dumps(step_phases(events, gpu), indent=2) + "\n")
        run.log(f"profile: {folder}")

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    schedule = torch.profiler.schedule(wait=0, warmup=PROFILE_WARMUP, active=run.cfg.train.profile_steps, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write)


def step_phases(events, gpu: bool) -> dict[str, float]:
    """Milliseconds per profiled step: the whole step, the loop's phases (inclusive; under DeepSpeed the
    optimizer step runs inside backward), and what matmuls and collectives took themselves (self time; on a GPU,
    device time)."""
    self_time = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    by_name = {e.key: e for e in events}
    steps = sum(e.count for e in events if e.key.startswith("ProfilerStep"))
    if not steps:
        return {}
    per_step = lambda us: round(us / steps / 1000, 3)  # noqa: E731  (profiler times are microseconds)
    out = {"steps": steps, "step_ms": per_step(sum(e.cpu_time_total for e in events
                                                    if e.key.startswith("ProfilerStep")))}
    for phase in ("forward", "dynamics", "backward", "optimizer"):
        event = by_name.get(f"llmkit/{phase}")
        out[f"{phase}_ms"] = per_step(event.cpu_time_total) if event else 0.0
    out["gemm_ms"] = per_step(sum(self_time(e) for e in events if e.key in GEMM_OPS))
    out["collectives_ms"] = per_step(sum(self_time(e) for e in events if e.key.startswith("c10d::")))
    out["data_ms"] = per_step(sum(e.cpu_time_total for e in events if e.key.startswith("enumerate(DataLoader)")))
    return out
