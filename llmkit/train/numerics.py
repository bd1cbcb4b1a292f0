"""What `llmkit check-numerics` concludes from a run and its reference (llmkit.train.reference): the tolerances the
run's precision allows, each step's numbers and every trained parameter held against them, and the first step
and the parameters that diverge, with the sizes of their differences.

The tolerances, derived. A float format rounds each result to within its unit roundoff u, relative: 2^-24 in
fp32, 2^-11 in fp16, 2^-8 in bf16. The run and the reference compute the same sums, in other orders and (a
bf16/fp16 run) on rounded operands:
- order: a sum of n terms added in another order moves by at most n·u_fp32 of the sum of their magnitudes
  (Higham's γ_n), by about √n·u_fp32 when the roundings are independent. n is the longest sum the ranks, buckets,
  partitions or the accumulation regroup: the model's widest inner dimension, the tokens of a micro-batch (a
  weight's gradient sums over them), ranks x accumulation. Sums accumulate in fp32 in every precision.
- operands: a bf16/fp16 run rounds each weight and activation once more, u_p relative; the fp32 reference does
  not (u_p = 0 for an fp32 run).
One step's numbers therefore differ by about ε = u_p + √n·u_fp32, relative. The differences carry over through the
weights, so step k's numbers hold the k-1 earlier steps' too and grow about linearly:
- step k's loss, gradient norm and each trained parameter's update norm: τ_k = S·k·ε;
- every trained parameter after the last step N, relative to how far the reference moved it: τ_w = S·N·ε;
- the learning rate: the same schedule in the same float64 arithmetic: 1e-9.
That bound says nothing of a number rounding alone decides: a weight whose true gradient is 0 (an attention key's
bias: softmax ignores a shift) is moved by Adam, which divides its rounding-level gradient by √v, as far as a
rounding happens to push it. So the rounding of this model, these rows and this precision is also measured: the
reference's rounding twin (llmkit.train.reference) replays the same steps adding the micro-batches in the opposite
order and, for a bf16/fp16 run, computing in that precision. Each number x may then differ from the reference by
   allowed(x) = max(τ·|x_ref|, S·|x_twin - x_ref|)
(for a parameter, τ_w times how far the reference moved it, or S times how far the twin ended from it). Where the
twin's update differs from the reference's by half of it or more, rounding decides that update, and the run may
take any step Adam can: at step k each element moves at most lr_k·√k (bias-corrected |m/√v| ≤ √k), so a rounding-
decided update may differ by twice that (Adam's reach). S = SAFETY covers what neither sees: the ranks' thread
counts, DeepSpeed's buckets, DeepSpeed's CPU Adam (it evaluates 1 - β2^k in fp32). For a sum of n = 144 terms (the
tests' model) S·√n·u is 1.3·n·u, about Higham's worst case; the clean runs the tests measure stay inside it by 5x
or more, every planted fault is outside by 10^3 or more (README, check-numerics)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
SAFETY = 16
LR_TOLERANCE = 1e-9
NAMED = 10  # parameters named per step and at the end (the verdict counts the rest)
ROUNDING_DECIDED = 0.5  # the twin's update this far from the reference's (relative): rounding decides it


def reach(lr: list[float], size: int) -> float:
    """The farthest Adam moves a parameter of `size` elements in these steps (L2): lr_k·√k per element at step k."""
    return math.sqrt(size) * sum(x * math.sqrt(k) for k, x in enumerate(lr, start=1))


@dataclass
class Tolerances:
    precision: str
    steps: int
    terms: int  # n: the longest regrouped sum
    per_step: float  # ε, one step's relative difference
    parameters: float  # τ_w

    def step(self, k: int) -> float:
        """τ_k: the relative tolerance of step k's numbers."""
        return SAFETY * k * self.per_step

    def record(self) -> dict:
        return {**asdict(self), "safety": SAFETY, "lr": LR_TOLERANCE,
                "unit_roundoff": UNIT_ROUNDOFF[self.precision],
                "per_step_rule": "tau_k = S*k*(u_p + sqrt(n)*u_fp32)", "parameters_rule": "tau_w = S*N*eps",
                "allowed": "max(tau*|reference|, S*|rounding twin - reference|)"}


def tolerances(precision: str, steps: int, terms: int) -> Tolerances:
    """The tolerances of an N-step run in `precision` whose longest regrouped sum has `terms` terms."""
    u_p = 0.0 if precision == "fp32" else UNIT_ROUNDOFF[precision]
    eps = u_p + math.sqrt(max(terms, 1)) * UNIT_ROUNDOFF["fp32"]
    return Tolerances(precision, steps, terms, eps, SAFETY * steps * eps)


def relative(diff: float, ref: float) -> float:
    """|diff| / |ref|; 0 when both are 0, infinite when only the reference is 0."""
    if diff == 0:
        return 0.0
    return abs(diff) / abs(ref) if ref != 0 else math.inf


def _held(run: float | None, ref: float, allowed: float) -> dict | None:
    """One number against the reference: its relative difference and tolerance (allowed / |reference|)."""
    if run is None:
        return None
    diff = abs(run - ref)
    return {"run": run, "reference": ref, "relative": relative(diff, ref), "tolerance": relative(allowed, ref),
            "diverged": not diff <= allowed, "ratio": diff / allowed if allowed else (0.0 if not diff else math.inf)}


def compare_steps(run: dict, ref, tol: Tolerances, sizes: dict[str, int]) -> list[dict]:
    """Step by step: loss, gradient norm (where the run logged one), learning rate, each parameter's update norm.
    `run`: {"loss": {step: x}, "grad_norm": {step: x}, "lr": [x per step], "update_norms": [{name: x} per step]};
    `ref`: llmkit.train.reference.Replayed, with its rounding twin; `sizes`: each parameter's element count."""
    out = []
    for k in range(1, tol.steps + 1):
        t, twin = tol.step(k), ref.twin

        def allowed(x_ref: float, twin_diff: float, t: float = t) -> float:
            return max(t * abs(x_ref), SAFETY * twin_diff)

        updates = []
        for name, want in ref.update_norms[k - 1].items():
            twin_diff = twin["updates"][k - 1][name]
            rounding = twin_diff >= ROUNDING_DECIDED * want
            room = allowed(want, twin_diff)
            if rounding:  # twice Adam's reach at this step: two steps in opposite directions
                room = max(room, 2 * math.sqrt(k) * ref.lr[k - 1] * math.sqrt(sizes[name]))
            held = _held(run["update_norms"][k - 1][name], want, room)
            updates.append({"name": name, "rounding_decided": rounding, **held})
        updates.sort(key=lambda u: -u["ratio"])
        diverged = [u for u in updates if u["diverged"]]
        loss, norm = ref.loss[k - 1], ref.grad_norm[k - 1]
        out.append({
            "step": k, "bound": t,
            "loss": _held(run["loss"].get(k), loss, allowed(loss, abs(twin["loss"][k - 1] - loss))),
            "grad_norm": _held(run["grad_norm"].get(k), norm, allowed(norm, abs(twin["grad_norm"][k - 1] - norm))),
            "lr": _held(run["lr"][k - 1], ref.lr[k - 1], LR_TOLERANCE * abs(ref.lr[k - 1])),
            "update_norms": {"worst": updates[0] if updates else None, "diverged": len(diverged),
                             "named": diverged[:NAMED]},
        })
    return out


def compare_weights(initial: dict, run_final: dict, ref, trainable: list[str], tol: Tolerances) -> list[dict]:
    """Every parameter after the last step, the farthest past its tolerance first: a trained one against the
    reference (relative to how far the reference moved it; the elements past the tolerance named), a frozen one
    must not have moved at all."""
    out = []
    for name in sorted(initial):
        w0, got, want = initial[name].double(), run_final[name].double(), ref.final[name].double()
        if name not in trainable:
            moved = float((got - w0).norm())
            out.append({"name": name, "frozen": True, "relative": relative(moved, 0.0), "difference": moved,
                        "ratio": relative(moved, 0.0), "diverged": moved > 0})
            continue
        diff, moved = got - want, want - w0
        size, scale = float(diff.norm()), float(moved.norm())
        twin_diff = float((ref.twin["weights"][name].double() - want).norm())
        allowed = max(tol.parameters * scale, SAFETY * twin_diff)
        rounding = twin_diff >= ROUNDING_DECIDED * scale
        if rounding:
            allowed = max(allowed, 2 * reach(ref.lr, diff.numel()))
        entry = {"name": name, "frozen": False, "rounding_decided": rounding, "relative": relative(size, scale),
                 "difference": size,
                 "moved": scale, "tolerance": relative(allowed, scale), "max_abs": float(diff.abs().max()),
                 "ratio": size / allowed if allowed else relative(size, 0.0), "diverged": not size <= allowed}
        if entry["diverged"]:
            past = torch.nonzero(diff.flatten().abs() > allowed / math.sqrt(diff.numel())).flatten()
            if len(past):
                entry["elements"] = {"first": int(past[0]), "last": int(past[-1]), "count": len(past),
                                     "of": diff.numel()}
        out.append(entry)
    out.sort(key=lambda e: -e["ratio"])
    return out


def _quantities(step: dict) -> list[tuple[str, dict]]:
    """(what, its comparison) of one step, those compared."""
    items = [(q, step[q]) for q in ("loss", "grad_norm", "lr") if step[q] is not None]
    worst = step["update_norms"]["worst"]
    if worst is not None:
        items.append((f"update norm of {worst['name']}", worst))
    return items


def verdict(steps: list[dict], weights: list[dict], tol: Tolerances) -> dict:
    """The conclusion: passed or not, the first divergent step and what diverged there, the parameters that
    diverge at the end, and how far each kind of number stayed from its tolerance (measured / tolerance)."""
    first = next((s for s in steps if any(c["diverged"] for _, c in _quantities(s))), None)
    diverged = [w for w in weights if w["diverged"]]
    margins: dict[str, float] = {}
    for s in steps:
        for what, c in _quantities(s):
            key = "update_norms" if what.startswith("update norm") else what
            margins[key] = max(margins.get(key, 0.0), c["ratio"])
    if weights:
        margins["parameters"] = max(w["ratio"] for w in weights)
    at = None
    if first is not None:
        at = {"step": first["step"], "what": [{"quantity": what, **c} for what, c in _quantities(first)
                                               if c["diverged"]],
              "parameters": first["update_norms"]["named"]}
    return {"passed": first is None and not diverged, "first_divergent_step": first["step"] if first else None,
            "divergence": at, "parameters_diverged": len(diverged), "parameters_checked": len(weights),
            "parameters": weights, "margins": margins,
            "tolerances": tol.record(), "steps": steps}


def summary(v: dict, what: str) -> str:
    """The one line the command prints: the verdict, where it diverged, or how close it came."""
    if v["passed"]:
        worst = max(v["margins"].items(), key=lambda kv: kv[1]) if v["margins"] else ("nothing", 0.0)
        return (f"check-numerics: PASSED: {what}: every step's loss, gradient norm, learning rate and update and "
                f"all {v['parameters_checked']} parameters within the {v['tolerances']['precision']} tolerances "
                f"(closest: {worst[0]} at {worst[1]:.1%} of its tolerance)")
    parts = []
    if v["divergence"] is not None:
        d = v["divergence"]
        said = ", ".join(f"{c['quantity']} {c['run']:.6g} vs {c['reference']:.6g} (relative {c['relative']:.2e}, "
                         f"tolerance {c['tolerance']:.2e})" for c in d["what"][:3])
        parts.append(f"first divergent step {d['step']}: {said}")
    if v["parameters_diverged"]:
        top = v["parameters"][0]
        parts.append(f"{v['parameters_diverged']} parameter(s) diverge at the end, the most {top['name']} "
                     f"(relative {top['relative']:.2e}, tolerance {top.get('tolerance', 0.0):.2e})")
    return f"check-numerics: DIVERGED: {what}: " + "; ".join(parts)
