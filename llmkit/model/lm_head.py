"""A causal LM's output projection only where a token is scored, a chunk of positions at a time: the training loss
and the evaluation's log-likelihoods without the `tokens x vocab` logits.

The model runs with `logits_to_keep` at one position a row (its own logits where each row's first target is
predicted: `out.logits` is [batch, 1, vocab], `out["logits_positions"]` says where) and hands back its last hidden
state (after the final norm); the positions whose next token is a target (labels != IGNORE after the shift) are
picked and projected with the output head's weight `chunk` positions at a time, each chunk's cross-entropy in fp32
as transformers' loss computes it. In training each chunk's gradients are made in forward while its logits are
alive (no recompute in backward), so at most `chunk` x vocab logits are alive at once. Each target's loss and
gradient are the ones the full logits give; only the order of the sums differs (rounding).

Under ZeRO-3 the head's weight is gathered whole here once per step (forward), on every rank alike,
however many chunks a rank has (calling the head module per chunk would gather once per call, and ranks with
different numbers of chunks would disagree on their collectives: measured, gloo aborts).

Written here because no library does it where llmkit runs: Liger's fused linear cross-entropy needs a CUDA GPU;
Cut Cross-Entropy's torch path projects every position at once under torch.compile and does not gather a ZeRO-3
weight."""

from __future__ import annotations

import contextlib
import inspect

import torch
import transformers.modeling_utils
from accelerate.utils import extract_model_from_parallel
from torch.nn import functional

from llmkit.config.schema import TrainConfig
from llmkit.data.packing import IGNORE

CHUNK = TrainConfig().loss_chunk  # positions projected at once outside a run: train.loss_chunk's default
# config keys of transformers' causal LMs that change the logits after the head (soft-capping, scaling): where one
# is set, the head's projection of the last hidden state is not the model's logits, and the full path runs
LOGIT_CHANGES = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def unwrapped(model):
    """The transformers model inside DeepSpeed / DDP / torch.compile and peft wrappers (LoRA layers stay inside)."""
    inner = extract_model_from_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def head_of(model) -> torch.nn.Linear:
    """The model's output head (its output embeddings)."""
    return unwrapped(model).get_output_embeddings()


def logit_change(config) -> str | None:
    """Why a model of this transformers config cannot take the chunked path, else None: its forward changes the
    logits after the head, or this transformers cannot keep one position's logits per row."""
    if not hasattr(transformers.modeling_utils, "slice_logits_to_keep"):
        return f"transformers {transformers.__version__} keeps no logits per row (logits_to_keep positions)"
    for c in (config, config.get_text_config()) if hasattr(config, "get_text_config") else (config,):
        for key in LOGIT_CHANGES:
            if getattr(c, key, None) not in (None, 1, 1.0):
                return f"{c.model_type} changes its logits after the head ({key})"
    return None


def inexact(model) -> str | None:
    """Why the chunked path would not give this model's loss, else None: logit_change of its config, or its head
    is not a plain linear layer (a LoRA-adapted or quantized head: its own forward is needed)."""
    inner = unwrapped(model)
    if (why := logit_change(inner.config)) is not None:
        return why
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return f"{type(inner).__name__}'s forward keeps no logits per position (logits_to_keep)"
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or not head.weight.dtype.is_floating_point:
        return f"its output head is a {type(head).__name__}, not a plain linear layer"
    return None


def forward_hidden(model, inputs: dict, targets: torch.Tensor):
    """The model's forward (through its wrappers: DeepSpeed and DDP see it) with its logits kept at each row's
    first scored position only (`targets[b, i]` is predicted at position i), and its last hidden state, after the
    final norm: (outputs, hidden [batch, seq, hidden])."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    first = (targets != IGNORE).int().argmax(1)[:, None]  # a row without a target keeps position 0
    out = model(**inputs, logits_to_keep=first, output_hidden_states=-1)  # -1: only the last one is kept
    out["logits_positions"] = first
    return out, out.hidden_states[-1]


def _gathered(*params):
    """ZeRO-3: the partitioned ones of `params` gathered whole for the block (one all-gather), else nothing."""
    parts = [p for p in params if p is not None and hasattr(p, "ds_id") and p.ds_status.name != "AVAILABLE"]
    if not parts:
        return contextlib.nullcontext()
    import deepspeed  # only a ZeRO-3 parameter gets here: DeepSpeed is loaded already

    return deepspeed.zero.GatheredParameters(parts)


def _logits(hidden, weight, bias) -> torch.Tensor:
    return functional.linear(hidden, weight, bias).float()  # fp32 for the loss, as transformers' ForCausalLMLoss


def _nll_in_place(logits, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy, and each row's sum of exp(logit - max): `logits` becomes exp(logit - max) in place
    (divided by the sums it is the softmax). By hand rather than torch.logsumexp, which makes a second tensor as
    large as the logits for exp(logit - max); the same max-shifted sums, so the same values up to rounding."""
    top = logits.amax(-1)
    target = logits.gather(1, targets[:, None])[:, 0]
    sums = logits.sub_(top[:, None]).exp_().sum(-1)
    return sums.log() + top - target, sums


def _chunked_nll(hidden, weight, bias, targets, chunk: int) -> torch.Tensor:
    """Each target's cross-entropy, `chunk` rows of logits alive at a time (no gradient: evaluation)."""
    parts = [_nll_in_place(_logits(hidden[lo:lo + chunk], weight, bias), targets[lo:lo + chunk])[0]
             for lo in range(0, len(targets), chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc fp32: in place where a and b are fp32 too (no temporary as large as the head's weight);
    a 16-bit product (autocast's) is made in its dtype, as the full path's backward makes it, and added into fp32."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class _WeightedNLLSum(torch.autograd.Function):
    """sum_i w[i] * cross-entropy of `hidden[i] @ weight.T + bias` against `targets[i]`, `chunk` rows at a time.

    The gradients are computed in forward, while each chunk's logits are alive (softmax - one-hot, times w[i], is
    the gradient of the logits, as autograd's), and backward only scales them by the loss's gradient: each chunk's
    logits are made once, as the full path makes them, not again in backward (recomputing them cost a third more
    time in the head on CPU). Where the weight trains its gradient (fp32) is held from forward to backward; the
    full path makes it at the start of backward, with the activations as alive, so the peak is the same
    (bench/logits_terms.py). w[i] is a class weight or 1, so the logits' gradient keeps the scale it has on the full
    path (fp16's range); the loss's scale (1 / the target count, fp16's loss scale) is applied in backward, in fp32.

    `own` (ZeRO-3: the model's own logits where it kept them; else None) gets a zero gradient: it ties the head
    module's backward after this one, so the head's gradient is accumulated where its module's hooks have the weight
    whole (ZeRO-3 gathers it for the head's backward; autograd needs the whole shape to accumulate into). That
    backward makes a zero gradient as large as the weight, so it runs under ZeRO-3 only: elsewhere the own logits
    get no gradient and the head's backward does not run for them (their loss is not read)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, w, chunk: int, own):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, len(targets), chunk):
            h, t = hidden[lo:lo + chunk], targets[lo:lo + chunk]
            wt = None if w is None else w[lo:lo + chunk]
            logits = _logits(h, weight, bias)
            nll, sums = _nll_in_place(logits, t)
            total += nll.sum() if wt is None else (nll * wt).sum()
            if not (need_h or need_w or need_b):
                continue
            scale = sums.reciprocal_() if wt is None else wt / sums
            probs = logits.mul_(scale[:, None])  # the softmax (times the class weight), in the logits' memory
            probs[torch.arange(len(t), device=t.device), t] -= 1 if wt is None else wt
            g = probs.to(h.dtype)  # d loss / d logits in the compute dtype, as the head's linear backward takes it
            del logits, probs  # before the next chunk's logits: one chunk alive at a time
            if need_h:
                grad_hidden[lo:lo + chunk] = g @ weight.to(h.dtype)
            if need_w:
                _add_product(grad_weight, g.t(), h)  # each chunk's part summed in fp32
            if need_b:
                grad_bias += g.sum(0).float()
            del g
        ctx.grads = grad_hidden, grad_weight, grad_bias  # not saved tensors: backward hands them over, see there
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.own = None if own is None else (own.shape, own.dtype, own.device)
        return total

    @staticmethod
    def backward(ctx, grad):
        scale, made = grad.float(), ctx.grads
        del ctx.grads  # the returned tensors are then autograd's alone: a tied embedding's gradient adds in place
        # scaled in place (the weight's gradient is as large as the head: no second copy of it)
        grads = tuple(None if g is None else g.mul_(scale).to(dtype) for g, dtype in zip(made, ctx.dtypes))
        del made
        own = None if ctx.own is None else torch.zeros(ctx.own[0], dtype=ctx.own[1], device=ctx.own[2])
        return (*grads, None, None, None, own)


@contextlib.contextmanager
def _projection(model, hidden: torch.Tensor, targets: torch.Tensor):
    """The scored positions' hidden states and targets (IGNORE skipped) and the head's weight and bias, cast as
    autocast runs the head's linear and gathered whole under ZeRO-3 (around the call, so autograd records the
    weight's whole shape, its gradient's, as a module's hooks do); autocast is off inside: (hidden, targets,
    weight, bias, mask)."""
    head = head_of(model)
    weight, bias = head.weight, head.bias
    mask = targets != IGNORE
    picked, wanted, device = hidden[mask], targets[mask], hidden.device.type
    with _gathered(weight, bias):
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            picked, weight, bias = picked.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            yield picked, wanted, weight, bias, mask


@torch.no_grad()
def scored_nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """Next-token negative log-likelihood of every target (`targets[b, i]` is predicted by `hidden[b, i]`, IGNORE
    skipped) through the model's output head, `chunk` positions projected at a time, no gradient: (nll of the
    targets in row-major order, the targets' mask). Under autocast the projection runs in its dtype."""
    with _projection(model, hidden, targets) as (picked, wanted, weight, bias, mask):
        return _chunked_nll(picked, weight, bias, wanted, chunk), mask


def causal_lm_loss(model, batch: dict, class_ids: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                   chunk: int = CHUNK):
    """The model's outputs with `.loss` the next-token loss on the batch's labels, as transformers computes it (the
    mean over target tokens), or with `weights` (per class) and `class_ids` (per row) each row's tokens weighted by
    its class (sum of w * nll over sum of w): without the full logits."""
    targets = batch["labels"][:, 1:]
    out, hidden = forward_hidden(model, batch, targets)
    with _projection(model, hidden[:, :-1], targets) as (picked, wanted, weight, bias, mask):
        w = None if weights is None else weights.to(picked.device).float()[class_ids][:, None].expand_as(mask)[mask]
        if torch.is_grad_enabled():
            tie = out.logits if hasattr(head_of(model).weight, "ds_id") else None  # ZeRO-3 only: see the Function
            total = _WeightedNLLSum.apply(picked, weight, bias, wanted, w, chunk, tie)
        else:  # no gradient to make in forward (a Function's needs_input_grad does not see no_grad)
            nll = _chunked_nll(picked, weight, bias, wanted, chunk)
            total = nll.sum() if w is None else (nll * w).sum()
    out["loss"] = total / (mask.sum() if w is None else w.sum())
    return out


@torch.no_grad()
def head_mismatch(model, out) -> float:
    """How far the head's projection of the last hidden state is from the model's own logits where it kept them,
    relative to their scale: 0 up to rounding where the chunked path gives the model's loss."""
    head, hidden = head_of(model), out.hidden_states[-1]
    kept = torch.take_along_dim(hidden, out["logits_positions"][..., None], 1)[:, 0]
    with _gathered(head.weight, head.bias):
        mine = functional.linear(kept, head.weight, head.bias).float()
    theirs = out.logits[:, 0].float()
    return float((mine - theirs).abs().max() / theirs.abs().max().clamp(min=1e-6))


@torch.no_grad()
def target_logprobs(model, inputs: dict, targets: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """Per-sequence sums of the log-likelihoods of the targets (aligned with the input ids, as labels are: each
    predicted by the position before it; IGNORE skipped), and the target counts, without the full logits."""
    _, hidden = forward_hidden(model, inputs, targets[:, 1:])
    nll, mask = scored_nll(model, hidden[:, :-1], targets[:, 1:], chunk)
    logp = torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device)
    logp[mask] = -nll
    return logp.sum(1), mask.sum(1).float()
