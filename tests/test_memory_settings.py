"""One memory estimate (issue 46): `llmkit estimate-memory` and a run's preflight print the same table, term by
term, for the same settings; and each term the two used to count differently, against what the library allocates
(DeepSpeed 0.19's stage_1_and_2.py / stage3.py, peft, bitsandbytes through transformers)."""

from __future__ import annotations

import pytest

from llmkit import cli, memory, model
from llmkit.config import LoraConfig, ModelConfig, load_config
from llmkit.launch import preflight
from llmkit.launch.precision import Hardware

RUNTIME = 0.5 * 2**30  # the process's resident memory before the model loads: measured, so fixed here
GPU = Hardware(gpus=2, gpu_name="A100", capability=(8, 0), memory_bytes=80 * 2**30)
CPU = Hardware(cpu_bf16=True, memory_bytes=2**40)

# (name, command flags, the run's config keys, its launch: DeepSpeed JSON (None: no DeepSpeed), zero.Init, hardware)
WALK = [
    ("no DeepSpeed", ["--no-deepspeed", "--zero-stage", "0"], {}, None, False, GPU),
    ("no DeepSpeed, CPU", ["--no-deepspeed", "--zero-stage", "0", "--device", "cpu"], {}, None, False, CPU),
    ("ZeRO-0", ["--zero-stage", "0"], {}, "zero0", False, GPU),
    ("ZeRO-1", ["--zero-stage", "1"], {}, "zero1", False, GPU),
    ("ZeRO-2", ["--zero-stage", "2"], {}, "zero2", False, GPU),
    ("ZeRO-2, CPU", ["--zero-stage", "2", "--device", "cpu"], {}, "zero2", False, CPU),
    ("ZeRO-3", ["--zero-stage", "3"], {}, "zero3", True, GPU),
    ("ZeRO-2, full logits", ["--zero-stage", "2", "--loss-chunk", "0"], {"train.loss_chunk": 0}, "zero2", False, GPU),
    ("ZeRO-2, optimizer offload", ["--zero-stage", "2", "--offload", "optimizer"], {}, "zero2_offload", False, GPU),
    ("ZeRO-3, both offloaded", ["--zero-stage", "3", "--offload", "both"], {}, "zero3_offload", True, GPU),
    ("ZeRO-3, both offloaded, CPU", ["--zero-stage", "3", "--offload", "both", "--device", "cpu"], {},
     "zero3_offload", True, CPU),
    ("LoRA, no DeepSpeed", ["--no-deepspeed", "--zero-stage", "0", "--lora-r", "4"], {"lora.enabled": True,
                                                                                       "lora.r": 4}, None, False, GPU),
    ("LoRA, ZeRO-2", ["--zero-stage", "2", "--lora-r", "4"], {"lora.enabled": True, "lora.r": 4}, "zero2", False,
     GPU),
    ("QLoRA, no DeepSpeed", ["--no-deepspeed", "--zero-stage", "0", "--lora-r", "4", "--qlora"],
     {"lora.enabled": True, "lora.r": 4, "lora.load_in_4bit": True}, None, False, GPU),
    ("QLoRA, ZeRO-3", ["--zero-stage", "3", "--lora-r", "4", "--qlora"],
     {"lora.enabled": True, "lora.r": 4, "lora.load_in_4bit": True}, "zero3", True, GPU),
]


def _run_table(keys: dict, deepspeed: str | None, zero_init: bool, hw: Hardware, recipe: str, monkeypatch) -> list:
    """The memory table the run's preflight logs (preflight.check, as the recipe calls it) on 2 ranks."""
    for var, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"),
                       ("ACCELERATE_DEEPSPEED_ZERO3_INIT", str(zero_init).lower())):
        monkeypatch.setenv(var, value)
    for var in ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, [part for k, v in keys.items() for part in (f"--{k}", str(v))]
                      + (["--deepspeed.config_file", deepspeed] if deepspeed else []))
    plan = preflight.check(cfg, 2, recipe, hw=hw)
    said = next(line for line in plan.checked if line.startswith("memory"))
    return [line[6:] for line in said.splitlines()[1:]]


def _command_table(flags: list[str], capsys) -> list:
    """The table `llmkit estimate-memory` prints, run in this process."""
    cli.main(["estimate-memory", "--num-gpus", "2", *flags])
    return capsys.readouterr().out.splitlines()[:-1]  # less its closing note


@pytest.mark.parametrize(("recipe", "task"), [("causal_lm", "causal-lm"), ("classification", "classification")])
def test_the_command_and_the_preflight_print_one_estimate(recipe, task, tiny_lm, tiny_bert, tmp_path, monkeypatch,
                                                          capsys):
    """Every walked setting (ZeRO 0-3, offload, LoRA, QLoRA, with and without DeepSpeed, GPU and CPU ranks): the
    same table, so the same "live at peak" (before, the command left out ZeRO-3's gathered parameters, the
    evaluation batch and the runtime, counted a CPU's activations and a 4-bit QLoRA base everywhere)."""
    monkeypatch.setattr(memory, "resident_bytes", lambda: RUNTIME)
    monkeypatch.setattr(preflight, "_version", lambda package: (0, 50))  # QLoRA's bitsandbytes, not installed here
    calls, one = [], memory.for_settings  # what each side hands the one function, and what it gets back
    monkeypatch.setattr(memory, "for_settings", lambda s: calls.append((s, one(s))) or calls[-1][1])
    where = tiny_lm / "model" if recipe == "causal_lm" else tiny_bert
    batch = {"train.per_device_batch_size": 4, "data.max_length": 32, "train.eval_batch_size": 8,
             "train.precision": "bf16"}
    flags = ["--model", str(where), "--task", task, "--precision", "bf16", "--batch-size", "4", "--seq-len", "32",
             "--eval-batch-size", "8"]
    for name, extra, keys, deepspeed, zero_init, hw in WALK:
        run = _run_table({"model.name_or_path": where, "data.dataset": "unread", **batch, **keys,
                          "output.output_dir": tmp_path / name.replace(" ", "_").replace(",", "")},
                         deepspeed, zero_init, hw, recipe, monkeypatch)
        command = _command_table(flags + extra, capsys)
        (run_settings, run_est), (command_settings, command_est) = calls[-2:]
        assert command_settings == run_settings and command_est == run_est, name  # the same inputs, every byte
        total = [line for line in run if line.startswith(f"  {memory.LIVE}")]
        with capsys.disabled():
            print(f"\n{recipe}, {name}: run {total[0].split()[3]} GiB, command "
                  f"{next(x for x in command if x.startswith(f'  {memory.LIVE}')).split()[3]} GiB")
        assert command == run, name


def test_zero3_gathers_every_parameter_for_compute(tiny_lm):
    """ZeRO-3 under DeepSpeed's defaults (1e9 live parameters) keeps the whole model gathered on each rank while it
    computes: the command adds it as the run does (it printed 2.72 GiB against the run's 2.97 for SmolLM2)."""
    sizes = model.model_sizes(ModelConfig(name_or_path=str(tiny_lm / "model")), causal_lm=True)
    zero = {"stage": 3, "stage3_max_live_parameters": 1e9, "stage3_prefetch_bucket_size": 1e3}
    est = memory.for_settings(memory.Settings(sizes, 2, "bf16", zero))
    assert est.gathered_bytes == 2 * sizes.params  # all of it, in bf16
    assert est.peak_device_bytes == est.param_bytes + est.gathered_bytes + est.grad_peak_bytes + est.optimizer_bytes


def test_an_offloaded_optimizer_holds_deepspeeds_fp32_gradient_partition_on_the_host():
    """ZeRO-Offload's host side, per rank: fp32 master (4), Adam's m and v (8) and the fp32 gradient partition the
    CPU Adam steps from (4: stage_1_and_2.py keeps single_partition_of_fp32_groups[i].grad on the CPU, stage3.py a
    subgroup_gradient_buffer per sub-group), 16P/N where 12P/N was printed; plus ZeRO-1/2's staging buffer of the
    largest param, or ZeRO-3's bf16 grad_partitions_flat_buffer (allocated on self.device, the CPU)."""
    P, T, L, N = 10**8, 10**7, 10**6, 4
    two = memory.estimate(P, 2, N, "bf16", offload_optimizer=True, largest_param=L, trainable=T)
    assert two.host_bytes == 16 * T / N + 2 * L and two.optimizer_bytes == 0
    one = memory.estimate(P, 1, N, "bf16", offload_optimizer=True, largest_param=L, trainable=T)
    assert one.host_bytes == 16 * T / N + 2 * L
    three = memory.estimate(P, 3, N, "bf16", offload_optimizer=True, largest_param=L, trainable=T)
    assert three.host_bytes == 16 * T / N + 2 * T / N
    fp32 = memory.estimate(P, 3, N, "fp32", offload_optimizer=True, largest_param=L, trainable=T)
    assert fp32.host_bytes == 16 * T / N + 4 * T / N  # the grad partition in the model's dtype
    # the device keeps no gradient partition: ZeRO-2 the param's full grad and the GPU staging buffer (2L each),
    # ZeRO-1 every grad until it reduces after backward, ZeRO-3 the param's grad
    assert (two.grad_backward_bytes, two.grad_step_bytes) == (4 * L, 2 * L)
    assert (one.grad_backward_bytes, one.grad_step_bytes) == (2 * T + 2 * L, 2 * L)
    assert (three.grad_backward_bytes, three.grad_step_bytes) == (2 * L, 0)
    # on CPU ranks the host is the device: what is offloaded counts in the peak, and is named when it is largest
    cpu = memory.for_run({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, P, N, "bf16",
                         largest_param=L, trainable=T, device="cpu")
    assert cpu.peak_device_bytes == cpu.param_bytes + cpu.grad_peak_bytes + cpu.host_bytes
    assert "offloaded (CPU)" in cpu.table() and "CPU (offload)" not in cpu.table()


def test_without_deepspeed_nothing_casts_the_checkpoint():
    """Plain data parallel keeps every weight in the dtype it loaded in (model.dtype, else the checkpoint's): an
    fp32 base under LoRA is 4 bytes a weight (it was counted at 2), the adapters fp32 too (peft's
    autocast_adapter_dtype) with their grads and AdamW's m and v; a bf16 checkpoint fully fine-tuned is 2 + 2 + 4.
    Under DeepSpeed bf16 the engine casts the module: the frozen base is 2 bytes."""
    sizes = model.Sizes(params=1000, largest=100, trainable=100, largest_trainable=10)
    lora = memory.for_settings(memory.Settings(sizes, 1, "bf16", lora=True, load_width=4.0))
    assert lora.param_bytes == 4 * 900 + 4 * 100 and (lora.grad_bytes, lora.optimizer_bytes) == (400, 800)
    assert memory.for_settings(memory.Settings(sizes, 1, "bf16", {"stage": 2}, lora=True,
                                               load_width=4.0)).param_bytes == 2 * 1000
    full = model.Sizes(params=1000, largest=100, trainable=1000, largest_trainable=100)
    bf16 = memory.for_settings(memory.Settings(full, 1, "bf16", load_width=2.0))
    assert (bf16.param_bytes, bf16.grad_bytes, bf16.optimizer_bytes) == (2000, 2000, 4000)
    assert memory.for_settings(memory.Settings(full, 1, "bf16", load_width=4.0)).device_bytes == 16 * 1000


def test_the_load_width_is_what_transformers_loads(tiny_lm):
    """model.dtype, else the checkpoint's own dtype (transformers' dtype "auto"), QLoRA's compute dtype, fp32 from
    scratch."""
    config = model.read_config(ModelConfig(name_or_path=str(tiny_lm / "model")))
    base = ["--model.name_or_path", str(tiny_lm / "model"), "--data.dataset", "unread"]
    plain = load_config(None, base)
    assert memory.load_width(plain, config, "bf16") == memory.file_width(plain, config) == 4  # saved in fp32
    assert memory.load_width(load_config(None, base + ["--model.dtype", "bfloat16"]), config, "fp32") == 2
    qlora = load_config(None, base + ["--lora.enabled", "true", "--lora.load_in_4bit", "true"])
    assert memory.load_width(qlora, config, "bf16") == 2
    assert memory.load_width(load_config(None, base + ["--model.from_scratch", "true"]), config, "bf16") == 4


def test_qlora_keeps_embeddings_norms_and_the_head_in_the_compute_dtype(tiny_lm):
    """bitsandbytes' Linear4bit replaces only the nn.Linear layers transformers converts: the attention and MLP
    projections, not the embeddings, the norms or the output head (get_keys_to_not_convert). Those are 4-bit NF4
    with double quantization (0.5 + 1/64 + 4/16384 bytes a weight), the rest stay in the compute dtype (ZeRO-3),
    or fp32 without DeepSpeed (peft's prepare_model_for_kbit_training upcasts them); it counted all at 0.5."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name_or_path=str(tiny_lm / "model"))
    real = AutoModelForCausalLM.from_pretrained(cfg.name_or_path)
    layers = sum(m.weight.numel() for n, m in real.named_modules() if type(m).__name__ == "Linear"
                 and ".layers." in n)
    lora = LoraConfig(enabled=True, r=4, load_in_4bit=True)
    sizes = model.model_sizes(cfg, causal_lm=True, lora=lora)
    assert sizes.quantized == layers > 0
    frozen = sizes.params - sizes.trainable
    rest = frozen - layers  # embeddings, norms, the head (tied or not)
    assert rest >= real.get_input_embeddings().weight.numel()
    zero3 = memory.for_settings(memory.Settings(sizes, 2, "bf16", {"stage": 3}, lora=True, qlora=True,
                                                load_width=2.0))
    assert zero3.param_bytes == pytest.approx((2 * sizes.trainable + memory.NF4_BYTES * layers + 2 * rest) / 2)
    plain = memory.for_settings(memory.Settings(sizes, 1, "bf16", lora=True, qlora=True, load_width=2.0))
    assert plain.param_bytes == pytest.approx(4 * sizes.trainable + memory.NF4_BYTES * layers + 4 * rest)


def test_the_command_says_which_device_its_activations_are_for(tiny_bert, capsys, monkeypatch):
    """An encoder's attention keeps fp32 math on a CPU and fused kernels on a GPU: the command names the one it
    counted (it counted a CPU's without saying so), and --device cpu gives the CPU's."""
    monkeypatch.setattr(memory, "resident_bytes", lambda: RUNTIME)
    flags = ["estimate-memory", "--model", str(tiny_bert), "--zero-stage", "2", "--batch-size", "8", "--seq-len", "64"]
    outs = {}
    for device in ("gpu", "cpu"):
        cli.main(flags + ["--device", device])
        outs[device] = capsys.readouterr().out
        assert f"activations as on a {device.upper()}" in outs[device]
    acts = {d: float(next(x for x in o.splitlines() if x.startswith("  activations")).split()[1]) for d, o in
            outs.items()}
    assert acts["cpu"] > acts["gpu"]
    assert "  runtime " in outs["cpu"] and "  runtime " not in outs["gpu"]  # a GPU's runtime is host memory


def test_the_run_reports_its_live_peak_under_the_estimates_name_beside_what_it_holds():
    """The estimate predicts live bytes; a CPU run's resident set holds more (glibc keeps freed blocks). The run
    measures the live peak (on a CPU: resident less malloc's free bytes, sampled) and reports it, and the estimate,
    as "live at peak" / live_peak_bytes, beside the peak held (peak_memory_bytes: what to provision)."""
    import time

    import torch

    from llmkit.train.meter import LiveSampler, _resident_high_water, memory_line, memory_summary

    sampler = LiveSampler(interval=0.002)
    before = sampler.peak
    block = torch.ones(16 * 2**20)  # 64 MiB, live until a sample sees it (the sampler backs off under load)
    deadline = time.monotonic() + 10
    while sampler.peak - before < 60 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.01)
    del block
    peak = sampler.stop()
    assert peak - before >= 60 * 2**20 and peak <= (_resident_high_water() or peak)
    assert sampler.stop() == peak  # stopped once; asked again, the same peak
    gib = 2**30
    ranks = {"peak_memory_bytes": [3 * gib, 2 * gib], "live_peak_bytes": [2 * gib, None]}
    summary = memory_summary(ranks, 1.5 * gib)
    assert summary == {"peak_memory_bytes": 3 * gib, "live_peak_bytes": 2 * gib,
                       "live_peak_estimated_bytes": int(1.5 * gib)}
    line = memory_line(summary)
    assert f"{memory.LIVE} 2.000 GiB (estimated 1.500 GiB); held at peak 3.000 GiB" in line
    assert memory.LIVE in memory.estimate(1000, 2, 2).table()  # the estimate's total carries the same name


def test_lora_under_autocast_holds_its_frozen_linears_in_the_compute_dtype(tiny_lm):
    """Without DeepSpeed, a LoRA run in bf16 keeps the frozen linears in bf16 (llmkit.model.lora): the estimate's
    weights are the bytes the loaded model holds, counted from it; in fp32 nothing is cast."""
    cfg = ModelConfig(name_or_path=str(tiny_lm / "model"))
    lora = LoraConfig(enabled=True, r=4, alpha=8)
    sizes = model.model_sizes(cfg, causal_lm=True, lora=lora)
    for precision in ("bf16", "fp32"):
        net = model.load_causal_lm(cfg, lora, precision=precision)
        held = sum(p.numel() * p.element_size() for p in net.parameters())
        est = memory.for_settings(memory.Settings(sizes, 1, precision, lora=True, load_width=4.0))
        assert est.param_bytes == held, precision


def test_zero3_training_the_head_counts_its_own_backward_beside_the_chunk():
    """The chunked loss under ZeRO-3, the head trained: the model's own logits take a zero gradient (so ZeRO-3
    gathers the head before its gradient lands, llmkit.model.lm_head) and the head's backward makes one of its
    weight's size; under ZeRO-2, or with LoRA (a frozen head), the chunk alone."""
    from llmkit.memory import activations

    sizes = model.Sizes(params=10**6, largest=10**5, trainable=10**6, largest_trainable=10**5)
    shape = activations.Shape("decoder", 2, 64, 128, 4, 2, 16)
    logits = {}
    for stage in (2, 3):
        for lora in (False, True):
            settings = memory.Settings(sizes, 2, "fp32", {"stage": stage}, lora=lora, shape=shape, batch=2, seq=32,
                                       vocab=1000, chunk=16)
            logits[stage, lora] = memory.for_settings(settings).logits_bytes
    assert logits[2, False] == logits[2, True] == logits[3, True] == 16 * 1000 * 4
    assert logits[3, False] == 16 * 1000 * 4 + 1000 * 64 * 4


def test_an_evaluation_batch_holds_one_layers_working_set_beside_its_logits():
    """No activations are kept in evaluation, but each layer's forward holds its tensors at once: counted as what
    one layer keeps for backward at the evaluation's tokens, beside the chunk of logits (with the logits chunked
    it can be the larger: a checkpointed label-word run peaked there, bench/README.md)."""
    from llmkit.memory import activations

    sizes = model.Sizes(params=10**6, largest=10**5, trainable=10**6, largest_trainable=10**5)
    shape = activations.Shape("decoder", 2, 64, 128, 4, 2, 16)
    settings = memory.Settings(sizes, 2, "fp32", {"stage": 2}, shape=shape, batch=2, seq=32, eval_rows=6,
                               vocab=1000, chunk=16)
    layer = 6 * 32 * activations.per_token_layer(shape, 4, None, True, 32, "cuda", "sdpa")
    assert memory.for_settings(settings).eval_bytes == layer + 16 * 1000 * 4
    assert memory.for_settings(memory.Settings(sizes, 2, "fp32", {"stage": 2}, shape=shape, batch=2, seq=32,
                                               vocab=1000, chunk=16)).eval_bytes == 0
