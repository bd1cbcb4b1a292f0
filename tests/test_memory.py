"""ZeRO memory formulas and DeepSpeed's gradient peak, parameter counting, the estimate-memory command."""

from __future__ import annotations

import pytest
from helpers import cli

from llmkit import memory
from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model import model_sizes

P = 7_500_000_000


@pytest.mark.parametrize(("stage", "per_param"), [(0, 16), (1, 4 + 12 / 64), (2, 2 + 14 / 64), (3, 16 / 64)])
def test_paper_formulas(stage, per_param):
    est = memory.estimate(P, stage, 64, "bf16")
    assert est.device_bytes == pytest.approx(per_param * P)


def test_paper_example_numbers():
    # arXiv:1910.02054 Fig. 1: 7.5B parameters on 64 devices -> 120 / 31.4 / 16.6 / 1.9 GB
    got = [memory.estimate(P, s, 64).device_bytes / 1e9 for s in range(4)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]


def test_offload_and_fp32():
    est = memory.estimate(1000, 3, 2, "bf16", offload_optimizer=True, offload_params=True)
    assert (est.param_bytes, est.optimizer_bytes, est.grad_bytes) == (0, 0, 1000)
    # the bf16 partitions (1000) and DeepSpeed's host side of the optimizer: fp32 master, m, v and the fp32 grad
    # partition (16 x 500), plus ZeRO-3's grad_partitions_flat_buffer on the CPU (2 x 500); was 1000 + 12 x 500
    assert est.host_bytes == 1000 + 16 * 500 + 2 * 500
    fp32 = memory.estimate(1000, 0, 1, "fp32")
    assert (fp32.param_bytes, fp32.grad_bytes, fp32.optimizer_bytes) == (4000, 4000, 8000)
    # ZeRO-1/2 step a clone of their partition (stage_1_and_2.py: single_partition_of_fp32_groups) even in fp32:
    # master 4 + m, v 8 a trained weight; ZeRO-3 steps its fp32 partition itself
    assert [memory.estimate(1000, s, 2, "fp32").optimizer_bytes for s in (1, 2, 3)] == [6000, 6000, 4000]
    with pytest.raises(LlmkitError, match="parameter offload needs ZeRO-3"):
        memory.estimate(1000, 2, 2, offload_params=True)


# bench/zero_memory.py, DeepSpeed 0.19.8, 2 CPU ranks, bf16: per-rank MiB, the rank with the larger total
SMOL, SMOL_L = 134_515_008, 28_311_552  # SmolLM2-135M, its (tied) embedding
MINI, MINI_L = 22_713_986, 11_720_448  # MiniLM classifier, its word embedding
MIB = 2**20


@pytest.mark.parametrize(("params", "largest", "stage", "grads", "total"), [
    (SMOL, SMOL_L, 0, 769.70, 2565.67), (SMOL, SMOL_L, 1, 384.78, 1411.05), (SMOL, SMOL_L, 2, 384.78, 1411.05),
    (SMOL, SMOL_L, 3, 385.48, 1283.53), (MINI, MINI_L, 0, 129.97, 433.24), (MINI, MINI_L, 3, 65.27, 216.96),
    # not here, the known gap: MiniLM ZeRO-1/2 measure 86.56 MiB of grads (est. 64.99), as the embedding straddles
    # the rank boundary and one rank's grad buffer holds the whole of it
])
def test_grad_peak_matches_deepspeed(params, largest, stage, grads, total):
    est = memory.estimate(params, stage, 2, "bf16", largest_param=largest)
    assert est.grad_peak_bytes / MIB == pytest.approx(grads, rel=0.01)
    assert est.peak_device_bytes / MIB == pytest.approx(total, rel=0.01)
    assert est.peak_device_bytes == est.param_bytes + est.grad_peak_bytes + est.optimizer_bytes
    # the paper's rows are unchanged: 2P grads, or 2P/N from ZeRO-2 on
    assert est.grad_bytes == 2 * params / (2 if stage >= 2 else 1)


def test_grad_peak_phases():
    P, N = SMOL, 2
    z0, z1 = memory.estimate(P, 0, N), memory.estimate(P, 1, N)
    assert (z0.grad_backward_bytes, z0.grad_step_bytes, z0.grad_peak_bytes) == (2 * P, 6 * P, 6 * P)
    assert (z1.grad_backward_bytes, z1.grad_step_bytes) == (2 * P, 6 * P / N)
    for stage in (2, 3):  # backward: the partition buffer plus the largest param's whole grad; the step: 6P/N
        est = memory.estimate(P, stage, N, largest_param=SMOL_L)
        assert est.grad_backward_bytes == 2 * P / N + 2 * SMOL_L
        assert est.grad_backward_bytes / MIB == pytest.approx(182.92, rel=0.01)  # measured in backward
        assert est.grad_step_bytes == est.grad_peak_bytes == 6 * P / N
        assert memory.estimate(P, stage, N).grad_backward_bytes == 2 * P / N  # largest not known
    mini = memory.estimate(MINI, 2, N, largest_param=MINI_L)
    assert mini.grad_backward_bytes == 2 * MINI / N + 2 * MINI_L
    # ZeRO-1 on many ranks: the full grads in backward are the peak, as in the paper
    z1_64 = memory.estimate(P, 1, 64)
    assert z1_64.grad_peak_bytes == z1_64.grad_backward_bytes == z1_64.grad_bytes == 2 * P
    assert memory.estimate(P, 1, 64, "fp16").grad_step_bytes == 6 * P / 64  # fp16: the same fp32 copies


def test_grad_peak_fp32_offload_and_no_deepspeed():
    P, L = SMOL, SMOL_L
    for stage, grads in ((0, 4 * P), (1, 4 * P), (2, 4 * P / 2), (3, 4 * P / 2)):
        est = memory.estimate(P, stage, 2, "fp32", largest_param=L)  # fp32: no copies
        assert est.grad_step_bytes == (4 * P / 2 if stage else 4 * P)
        assert est.grad_peak_bytes == grads + (4 * L if stage >= 2 else 0)
    off = memory.estimate(P, 2, 2, "bf16", offload_optimizer=True, largest_param=L)
    # the gradient partition and its fp32 copies are on the CPU (was 2P/N on the device): the device keeps the
    # param's full grad in backward and DeepSpeed's staging buffer of the largest param for the whole run
    assert (off.grad_backward_bytes, off.grad_step_bytes) == (2 * L + 2 * L, 2 * L)
    assert off.peak_device_bytes == off.param_bytes + 4 * L
    plain = memory.for_run(None, P, 2, "bf16", largest_param=L)  # autocast: fp32 grads, no copies, same 16P
    assert plain.grad_peak_bytes == plain.grad_bytes and plain.peak_device_bytes == plain.device_bytes == 16 * P
    assert "no DeepSpeed" in plain.table()
    ds = memory.for_run({"zero_optimization": {"stage": 3, "reduce_bucket_size": 10**6}}, P, 2, "bf16",
                        largest_param=L)
    assert ds.grad_peak_bytes == 6 * P / 2 + 2 * 10**6 and ds.largest_param == L  # + the bf16 reduce bucket
    with pytest.raises(LlmkitError, match="largest parameter"):
        memory.estimate(1000, 2, 2, largest_param=1001)


def test_table_shows_paper_and_peak():
    gib = 1024**3
    est = memory.estimate(SMOL, 2, 2, largest_param=SMOL_L)
    rows = {line[2:19].strip(): line for line in est.table().splitlines()[1:]}
    assert list(rows) == ["parameters", "gradients", "optimizer states", "total per device", "gradients at peak",
                          "live at peak"]
    assert rows["gradients"].split()[1] == f"{2 * SMOL / 2 / gib:.3f}"
    assert rows["gradients at peak"].split()[3] == f"{6 * SMOL / 2 / gib:.3f}"
    assert "largest param 28.3M" in rows["gradients at peak"] and "fp32 copies" in rows["gradients at peak"]
    assert rows["live at peak"].split()[-2] == f"{est.peak_device_bytes / gib:.3f}"


def test_count_parameters_matches_the_model(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    want = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    sizes = model_sizes(ModelConfig(name_or_path=str(tiny_bert)))
    assert (sizes.params, sizes.largest, sizes.trainable, sizes.largest_trainable) == (want, largest, want, largest)
    assert (memory.parameters_of(model), memory.largest_of(model)) == (want, largest)


def test_lora_sizes_count_what_peft_trains(tiny_bert):
    """On the meta device with the run's LoRA: the same trained parameters as the real model peft wraps (the
    adapters and the classifier head it trains in full), and the frozen rest."""
    from transformers import AutoModelForSequenceClassification

    from llmkit.config import LoraConfig
    from llmkit.model.lora import apply_lora

    lora = LoraConfig(enabled=True, r=4)
    real = apply_lora(AutoModelForSequenceClassification.from_pretrained(tiny_bert), lora, "SEQ_CLS")
    trained = [p.numel() for p in real.parameters() if p.requires_grad]
    sizes = model_sizes(ModelConfig(name_or_path=str(tiny_bert)), lora=lora)
    assert sizes.params == sum(p.numel() for p in real.parameters())
    assert (sizes.trainable, sizes.largest_trainable) == (sum(trained), max(trained)) and sizes.trainable < sizes.params / 5


def test_frozen_weights_have_no_gradients_or_optimizer_states():
    """A hand computation: 1,000 parameters of which 100 train, ZeRO-2 on 2 ranks, bf16."""
    est = memory.estimate(1000, 2, 2, "bf16", trainable=100)
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (2 * 1000, 2 * 100 / 2, 12 * 100 / 2)
    assert est.grad_step_bytes == 2 * 50 + 4 * 50  # the owned 16-bit grads and their fp32 copies
    qlora = memory.estimate(1000, 3, 2, "bf16", trainable=100, frozen_bytes=0.5)  # a 4-bit base, ZeRO-3
    assert qlora.param_bytes == (2 * 100 + 0.5 * 900) / 2
    assert "1,000 parameters" not in est.table() and "(0.00M trained, the rest frozen)" in est.table()
    full = memory.estimate(1000, 2, 2, "bf16")
    assert (full.grad_bytes, full.optimizer_bytes) == (2 * 1000 / 2, 12 * 1000 / 2)
    with pytest.raises(LlmkitError, match="trained parameters"):
        memory.estimate(1000, 2, 2, trainable=1001)


def test_estimate_memory_command(tiny_bert):
    """`llmkit estimate-memory` (in this process: it starts none) against the estimate computed here."""
    out = cli(["estimate-memory", "--model", tiny_bert, "--zero-stage", "2", "--num-gpus", "4"])
    assert out.returncode == 0, out.stderr
    params = model_sizes(ModelConfig(name_or_path=str(tiny_bert))).params
    assert f"ZeRO-2, 4 device(s), bf16, {params / 1e6:,.1f}M parameters" in out.stdout
    total = (2 + 14 / 4) * params / 1024**3
    line = next(x for x in out.stdout.splitlines() if "total per device" in x)
    assert line.split()[-2] == f"{total:.3f}"
    largest = model_sizes(ModelConfig(name_or_path=str(tiny_bert))).largest
    bucket = 2 * 25_000_000  # llmkit's "auto" reduce bucket for a small model: 25M bf16 elements
    peak = memory.estimate(params, 2, 4, largest_param=largest, bucket_bytes=bucket).peak_device_bytes / 1024**3
    line = next(x for x in out.stdout.splitlines() if "live at peak" in x)
    assert line.split()[-2] == f"{peak:.3f}"
    assert f"largest param {largest / 1e3:,.1f}K" in out.stdout and largest < 1e6  # a tiny model: in thousands
    lora = cli(["estimate-memory", "--model", tiny_bert, "--zero-stage", "2", "--lora-r", "4"])
    from llmkit.config import LoraConfig

    trained = model_sizes(ModelConfig(name_or_path=str(tiny_bert)), lora=LoraConfig(enabled=True, r=4)).trainable
    assert lora.returncode == 0 and f"({trained / 1e6:,.2f}M trained, the rest frozen)" in lora.stdout, lora.stderr
    # with a micro-batch: its activations (the same formula the run logs), less under gradient checkpointing
    from llmkit.memory import activations
    from llmkit.model import read_config

    shape = activations.shape_of(read_config(ModelConfig(name_or_path=str(tiny_bert))))
    acts = {}
    for ckpt in (False, True):
        got = cli(["estimate-memory", "--model", tiny_bert, "--zero-stage", "2", "--batch-size", "512", "--seq-len",
                   "128", *(["--gradient-checkpointing"] if ckpt else [])])
        assert got.returncode == 0, got.stderr
        acts[ckpt] = float(next(x for x in got.stdout.splitlines() if x.startswith("  activations")).split()[-2])
        # the command's default device is a GPU, and it says so (it counted a CPU's kernels without saying)
        assert "activations as on a GPU" in got.stdout
        want = activations.activation_bytes(shape, 512, 128, 2, checkpointing=ckpt, device="cuda") / 1024**3
        assert want > 0.01 and acts[ckpt] == pytest.approx(want, rel=0.05)
    assert acts[True] < acts[False]
    bad = cli(["estimate-memory", "--model", tiny_bert, "--zero-stage", "1", "--offload", "params"])
    assert bad.returncode == 2 and "llmkit: error: parameter offload needs ZeRO-3" in bad.stderr


def test_reduce_bucket_bytes_follow_deepspeed_allocation():
    assert memory.bucket_bytes({"stage": 0, "reduce_bucket_size": 10}, "bf16") == 0
    assert memory.bucket_bytes({"stage": 1, "reduce_bucket_size": 10}, "bf16") == 20
    assert memory.bucket_bytes({"stage": 2, "reduce_bucket_size": 10}, "bf16") == 20
    assert memory.bucket_bytes({"stage": 2, "reduce_bucket_size": 10, "overlap_comm": True}, "bf16") == 40
    assert memory.bucket_bytes({"stage": 3, "reduce_bucket_size": 10, "overlap_comm": True}, "bf16") == 20
    assert memory.bucket_bytes({"stage": 2, "reduce_bucket_size": 10}, "fp32") == 40
    assert memory.bucket_bytes({"stage": 2, "reduce_bucket_size": 10, "contiguous_gradients": False}, "bf16") == 0
    assert memory.bucket_bytes({"stage": 2}, "bf16") == 2 * 5e8  # DeepSpeed's default size
    # measured (bench/zero_memory.py, MiniLM, 2 ranks, 25M-element bucket): ZeRO-1 holds it on top of the full
    # bf16 grads in backward, ZeRO-3 also through the step
    P, bucket = 22_713_986, 5e7
    one = memory.estimate(P, 1, 2, "bf16", bucket_bytes=bucket)
    assert one.grad_peak_bytes == one.grad_backward_bytes == 2 * P + bucket  # 91.0 MiB measured
    three = memory.estimate(P, 3, 2, "bf16", largest_param=11_720_448, bucket_bytes=bucket)
    assert three.grad_step_bytes == 6 * P / 2 + bucket  # 112.7 MiB measured


def test_logits_and_runtime_terms_and_the_refusal_of_a_run_that_cannot_fit():
    """A hand computation of the loss over the vocabulary, the terms in the table and in the peak, and the one
    line that names the largest term and its switch."""
    assert memory.logits_bytes(4 * 256, 49_152, "bf16") == 4 * 256 * 49_152 * (2 + 4 + 4 + 4)
    assert memory.logits_bytes(1000, 100, "fp32") == 1000 * 100 * 12
    assert memory.eval_logits_bytes(16 * 2 * 160, 49_152, "bf16") == 16 * 2 * 160 * 49_152 * 14  # label words
    est = memory.for_run(None, 1000, 1, "fp32", logits=5000.0, runtime=9000.0)
    assert est.peak_device_bytes == 16 * 1000 + 5000 + 9000
    names = [line[2:19].strip() for line in est.table().splitlines()[1:]]
    assert names[-3:] == ["logits and loss", "runtime", "live at peak"]
    memory.check_fits(est, est.peak_device_bytes, "one test device")  # exactly enough passes
    with pytest.raises(LlmkitError, match=r"at least .* GiB per device at its peak, "
                                          r"one test device has .* largest term is runtime .*fewer ranks per"):
        memory.check_fits(est, est.peak_device_bytes - 1, "one test device")
    big = memory.for_run({"zero_optimization": {"stage": 2}}, 10**9, 2, "bf16", logits=1e8)
    with pytest.raises(LlmkitError, match="largest term is optimizer states .*ZeRO-1/2/3, optimizer offload"):
        memory.check_fits(big, 2**30, "one GPU")


def test_the_chunked_loss_holds_one_chunk_of_logits(tmp_path, tiny_lm):
    """train.loss_chunk (256 by default, llmkit.model.lm_head): the logits term and the evaluation batch's are one
    chunk's (its fp32 logits, their softmax in place; a 16-bit copy too in bf16/fp16), or the tokens' where they are
    fewer; the full logits where it is off or the model changes its logits after the head (soft-capping)."""
    from helpers import write_lm_config

    from llmkit import model
    from llmkit.config import load_config
    from llmkit.model import lm_head

    assert memory.logits_bytes(4 * 256, 49_152, "bf16", chunk=512) == 512 * 49_152 * (4 + 2)
    assert memory.logits_bytes(100, 49_152, "fp32", chunk=1024) == 100 * 49_152 * 4  # under a chunk
    assert memory.eval_logits_bytes(16 * 2 * 160, 49_152, "bf16", chunk=1024) == 1024 * 49_152 * 6
    # ZeRO-3 training the head: its own backward's gradient of the weight's size, in the compute dtype
    assert memory.logits_bytes(100, 49_152, "bf16", chunk=256, tied_head=49_152 * 576) == \
        100 * 49_152 * 6 + 49_152 * 576 * 2
    path = write_lm_config(tmp_path / "c.yaml", tiny_lm, tmp_path / "out", lora=False)

    def chunk(*overrides, **config_keys) -> int:
        cfg = load_config(path, list(overrides))
        config = model.read_config(cfg.model)
        for key, value in config_keys.items():
            setattr(config, key, value)
        sizes = model.model_sizes(cfg.model, causal_lm=True)
        return memory.settings_of(cfg, None, sizes, "fp32", 1, "gpu", config, causal=True).chunk

    assert chunk() == lm_head.CHUNK == 256
    assert chunk("--train.loss_chunk", "512") == 512
    assert chunk("--train.loss_chunk", "0") == 0
    assert chunk(final_logit_softcapping=30.0) == 0


def test_training_and_evaluation_batches_take_turns_at_the_peak():
    """Activations and the training loss are held together; an evaluation batch comes in their place, so the
    peak counts the larger of the two, and a refusal names activations with gradient checkpointing."""
    states = 16 * 1000 + 9000  # fp32, no DeepSpeed: 16P, and the runtime
    train = memory.for_run(None, 1000, 1, "fp32", logits=5000.0, runtime=9000.0, activations=7000.0,
                           evaluation=10_000.0)
    assert train.peak_device_bytes == states + 5000 + 7000  # 12,000 of training over 10,000 of evaluation
    evaluation = memory.for_run(None, 1000, 1, "fp32", logits=5000.0, runtime=9000.0, activations=7000.0,
                                evaluation=20_000.0)
    assert evaluation.peak_device_bytes == states + 20_000
    names = [line[2:19].strip() for line in evaluation.table().splitlines()[1:]]
    assert names[-5:] == ["activations", "logits and loss", "evaluation batch", "runtime", "live at peak"]
    assert "in place of activations + logits" in evaluation.table()
    deep = memory.for_run(None, 1000, 1, "fp32", activations=1e9)
    with pytest.raises(LlmkitError, match="largest term is activations .*model.gradient_checkpointing true"):
        memory.check_fits(deep, 2**29, "one GPU")


def test_validate_refuses_a_run_bigger_than_the_device(tmp_path, tiny_lm):
    """The preflight compares the estimate with the memory of one device (on CPU the host's, shared by its ranks;
    here a made-up host of 1 MiB) and refuses before any model loads; with enough memory it passes."""
    from helpers import write_lm_config

    from llmkit.config import load_config
    from llmkit.launch.precision import Hardware
    from llmkit.launch.preflight import check

    cfg = load_config(write_lm_config(tmp_path / "c.yaml", tiny_lm, tmp_path / "out", lora=False))
    with pytest.raises(LlmkitError, match=r"needs at least .* GiB per device .*this host's memory shared by 1 "
                                          r"rank\(s\) has 0\.00 GiB; the largest term is runtime"):
        check(cfg, 1, "causal_lm", hw=Hardware(memory_bytes=2**20))
    plan = check(cfg, 1, "causal_lm", hw=Hardware(memory_bytes=64 * 2**30))
    table = next(line for line in plan.checked if line.startswith("memory"))
    assert all(term in table for term in ("activations", "logits and loss", "evaluation batch", "runtime",
                                          "host at load"))
    assert not (tmp_path / "out").exists()


def test_zero3_holds_the_parameters_it_gathers():
    """ZeRO-3 keeps up to stage3_max_live_parameters + the prefetch bucket gathered whole (all of a model under
    DeepSpeed's 1e9 defaults), in the 16-bit width, a 4-bit frozen base at its packed size; nothing below stage 3."""
    zero = {"stage": 3, "stage3_max_live_parameters": 10**6, "stage3_prefetch_bucket_size": 5 * 10**5}
    assert memory.gathered_bytes(zero, 10**7, "bf16") == 2 * 1.5e6
    assert memory.gathered_bytes({"stage": 3}, 10**7, "bf16") == 2 * 10**7  # the defaults: the whole model
    assert memory.gathered_bytes({"stage": 3}, 10**7, "fp32") == 4 * 10**7
    # QLoRA: 1e6 adapters in bf16, 9e6 frozen weights at half a byte
    assert memory.gathered_bytes({"stage": 3}, 10**7, "bf16", trainable=10**6, frozen_bytes=0.5) == \
        2 * 10**6 + 0.5 * 9 * 10**6
    assert memory.gathered_bytes({"stage": 2}, 10**7, "bf16") == 0.0
    est = memory.for_run({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1}}, 10**9, 8, "bf16",
                         trainable=10**6)
    assert est.gathered_bytes == 2 * 10**9 and "gathered (ZeRO-3)" in est.table()
    assert est.peak_device_bytes == pytest.approx(est.param_bytes + est.gathered_bytes + est.grad_peak_bytes
                                                  + est.optimizer_bytes)
    with pytest.raises(LlmkitError, match=r"largest term is gathered \(ZeRO-3\) .*stage3_max_live_parameters"):
        memory.check_fits(est, 2**30, "one GPU")


def test_host_memory_at_load_by_hand_and_the_refusal_of_a_load_that_cannot_fit():
    """Reading the checkpoint (f bytes a weight) while the run's copy is made, or DeepSpeed's setup, whichever is
    more; ZeRO-3 under zero.Init keeps a partition and gathers one tensor at a time."""
    P, T, L, N = 10**8, 10**6, 10**7, 2
    # ZeRO-2 from an fp32 checkpoint, LoRA: reading 4P + the bf16 copy 2P; setup 2P + 2T + 4T/N is less
    assert memory.load_bytes(P, 4, "bf16", 2, N, trainable=T) == 4 * P + 2 * P
    # full fine-tuning from a bf16 checkpoint in bf16: the parameters are the mapped pages (2P, no copy); setup
    # (pages 2P + flat 2P + master 4P/N) passes reading (2P)
    assert memory.load_bytes(P, 2, "bf16", 2, N) == 2 * P + 2 * P + 4 * P / N
    # ZeRO-3: every rank reads and copies the whole model, unless zero.Init partitions it as it loads
    assert memory.load_bytes(P, 4, "bf16", 3, N, trainable=T, largest=L) == 4 * P + 2 * P
    assert memory.load_bytes(P, 4, "bf16", 3, N, trainable=T, zero_init=True, largest=L) == \
        4 * P + 2 * P / N + 2 * L
    # ... then sets up: partitions, the flat trained partition, fp32 master and gradient partitions (full FT of a
    # bf16 checkpoint: more than reading it)
    assert memory.load_bytes(P, 2, "bf16", 3, N, zero_init=True, largest=L) == (2 + 2 + 4 + 4) * P / N
    # plain data parallel in the checkpoint's own dtype: the parameters are the mapped pages, no copy
    assert memory.load_bytes(P, 4, "fp32", 0, 1, deepspeed=False) == 4 * P
    # so below ZeRO-3 under DeepSpeed too (an fp32 run of an fp32 checkpoint): LoRA reads 4P and copies nothing
    # (was 8P: 1.61 GiB estimated, 1.21 measured for SmolLM2); full fine-tuning holds the pages, ZeRO-2's flat
    # copy and the fp32 master partition ZeRO-1/2 clone even in fp32 (was 1.57 GiB for 1.90 measured)
    assert memory.load_bytes(P, 4, "fp32", 2, N, trainable=T) == 4 * P + 4 * T + 4 * T / N
    assert memory.load_bytes(P, 4, "fp32", 2, N) == 4 * P + 4 * P + 4 * P / N
    # ZeRO-3 without zero.Init counted with a copy, as in bf16: not measured in fp32 (cpu_zero3.yaml sets zero.Init)
    assert memory.load_bytes(P, 4, "fp32", 3, N) == 4 * P + 4 * P
    # stage 0 under DeepSpeed in bf16 keeps a whole fp32 master (FP16_UnfusedOptimizer), not a partition
    assert memory.load_bytes(P, 2, "bf16", 0, N) == 2 * P + 4 * P
    est = memory.for_run({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1}}, P, N, "bf16", trainable=T,
                         file_width=4, host_runtime=5e8)
    assert est.load_bytes == 5e8 + 6 * P and "host at load" in est.table()
    assert est.peak_device_bytes < est.load_bytes  # LoRA: the states are small, loading is the peak
    memory.check_fits(est, est.peak_device_bytes, "one GPU")  # a GPU's budget is not the host's
    with pytest.raises(LlmkitError, match=r"loading this model needs about 1\.02 GiB per rank .*has 0\.93 GiB: "
                                          r"use ZeRO-3 with zero3_init_flag: true"):
        memory.check_fits(est, 10**9, "this host's memory shared by 2 rank(s)", with_load=True)


def test_the_runtime_measured_again_after_set_up_moves_the_peak_and_the_load(tmp_path, tiny_lm, monkeypatch):
    """The preflight runs before the process group and DeepSpeed; once they are up the recipe measures the runtime
    again: on a CPU it moves both the peak and the load, on a GPU only the (host) load; a run that no longer fits
    is refused then, before the model loads."""
    from helpers import write_lm_config

    from llmkit.config import load_config
    from llmkit.launch import preflight
    from llmkit.launch.precision import Hardware

    zero = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1}}
    cpu = memory.for_run(zero, 10**8, 2, "bf16", runtime=5e8, file_width=4, host_runtime=5e8)
    again = cpu.rebased(6e8)
    assert again.peak_device_bytes == cpu.peak_device_bytes + 1e8 and again.load_bytes == cpu.load_bytes + 1e8
    gpu = memory.for_run(zero, 10**8, 2, "bf16", runtime=0.0, file_width=4, host_runtime=5e8)
    assert gpu.rebased(6e8).peak_device_bytes == gpu.peak_device_bytes
    assert gpu.rebased(6e8).load_bytes == gpu.load_bytes + 1e8

    cfg = load_config(write_lm_config(tmp_path / "c.yaml", tiny_lm, tmp_path / "out", lora=False))
    plan = preflight.check(cfg, 1, "causal_lm", hw=Hardware(memory_bytes=4 * 2**30))
    lines = preflight.recheck_memory(plan)
    assert lines.startswith("memory, the runtime measured again") and "live at peak" in lines
    monkeypatch.setattr(memory, "resident_bytes", lambda: 5 * 2**30)  # the process grew past the host
    with pytest.raises(LlmkitError, match="per device at its peak|loading this model needs"):
        preflight.recheck_memory(plan)
