"""Model and tokenizer loading: Hub id, local dir, asset:<name>, or random init from a config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from llmkit import assets, fresh, logs
from llmkit.config import LoraConfig, ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model.lora import apply_lora
from llmkit.rundir.layout import ADAPTER_CONFIG, MODEL_CONFIG


def locate(name_or_path: str, what: str) -> str:
    """Resolve assets and check local paths early, so a typo is not reported as a Hub download failure."""
    path = assets.resolve(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists() or path.count("/") > 1
    if looks_local:
        local = Path(path).expanduser()
        if not local.exists():
            raise LlmkitError(f"{what} '{name_or_path}' does not exist (neither a local dir nor a Hub id)")
        if local.is_file() and what == "model.name_or_path":
            raise LlmkitError(f"{what} '{name_or_path}' is a file; name the model's folder (the one holding "
                              "config.json and the weights)")
        if (local / ADAPTER_CONFIG).is_file() and what == "model.name_or_path":
            raise LlmkitError(f"{what} '{name_or_path}' is a LoRA adapter, not a model: train from its base model "
                              "(adapter_config.json names it), or export a merged model and start from that")
        if local.is_dir() and not (local / MODEL_CONFIG).is_file() and what == "model.name_or_path":
            raise LlmkitError(f"{what} '{name_or_path}' is a directory without config.json, so it is not a "
                              "transformers model folder")
        return str(fresh.absolute(local))  # also handed to fresh processes (the export check)
    return path


WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.gguf")


def check_weights_present(cfg: ModelConfig) -> None:
    """A local model folder must hold weights, unless the run starts from scratch: transformers would otherwise
    stop late with a long OSError, after the data is tokenized."""
    path = Path(assets.resolve(cfg.name_or_path)).expanduser()
    if cfg.from_scratch or not path.is_dir():
        return
    if not any(any(path.glob(pattern)) for pattern in WEIGHTS):
        raise LlmkitError(f"model.name_or_path '{cfg.name_or_path}' holds a config.json but no weights "
                          "(model.safetensors or pytorch_model.bin); copy them in, or set model.from_scratch: true "
                          "to train from a random init")
    check_export_weights(path, f"model.name_or_path '{cfg.name_or_path}'")


def check_export_weights(folder: Path, owner: str | None = None) -> None:
    """The safetensors files under `folder` are whole (a model to train from, or an export that llmkit eval,
    explain, generate and push read, which a crash or an interrupted copy may have cut): one clear line instead of
    safetensors' deserialisation error. `owner` names the folder in the message (default: its path)."""
    for file in sorted(Path(folder).rglob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise LlmkitError(f"{owner or folder}: {file.relative_to(folder)} {problem} (an interrupted copy or "
                              "write?); copy or write it again")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file by its header alone (microseconds, no weights read), or None. The
    format is an 8-byte little-endian header length, a JSON header of each tensor's byte range, then the bytes;
    safetensors' own reader maps the file lazily and would fail only when a missing tensor is first read."""
    import json
    import struct

    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short to be safetensors"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"is cut short: its header alone says {length} bytes, the file has {size}"
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "has a header that is not JSON: it is not a safetensors file"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"is cut short: {8 + length + end} bytes expected, {size} on disk"
    return None


def _hub_error(what: str, name: str, exc: Exception) -> LlmkitError:
    return LlmkitError(f"could not load {what} '{name}': {exc.__class__.__name__}: {str(exc).splitlines()[0]}. "
                       "If it is a Hub id, check the spelling and your network / HF_TOKEN; offline, use a local "
                       "folder or an llmkit asset (`llmkit assets`).")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerFast:
    """Fast tokenizer for the model, with a pad token."""
    name = locate(cfg.tokenizer or cfg.name_or_path, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
        # transformers would still build one from the config alone: a few special tokens, every word [UNK]
        raise LlmkitError(f"'{name}' holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the model's "
                          "tokenizer in, or name it with model.tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error("the tokenizer", name, exc) from None
    if not tok.is_fast:
        raise LlmkitError(f"the tokenizer of '{name}' has no fast (Rust) version; llmkit needs one for batched "
                          "tokenization. Point model.tokenizer at a folder with tokenizer.json.")
    if tok.pad_token is None:
        # decoder-only tokenizers often lack a pad token; padded positions are masked anyway
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise LlmkitError(f"the tokenizer of '{name}' has no pad, eos or unk token to pad with")
        tok.pad_token = fallback
    vocab = getattr(read_config(cfg), "vocab_size", None) if not needs_trained_tokenizer(cfg) else None
    separate = cfg.tokenizer is not None or not cfg.from_scratch  # from scratch, the table is sized to the tokenizer
    if vocab and separate and len(tok) > vocab:  # ids past the embedding table fail as an IndexError at step 1
        raise LlmkitError(f"the tokenizer '{name}' has {len(tok)} tokens but the model's vocabulary (its "
                          f"embeddings) holds {vocab}: they do not belong together. Use the model's own tokenizer "
                          "(leave model.tokenizer unset) or a model trained with this one.")
    if vocab and not cfg.from_scratch and len(tok) < vocab // 2:  # tables are padded a little, never halved
        raise LlmkitError(f"the tokenizer '{name}' has {len(tok)} tokens for a model whose embeddings hold {vocab}: "
                          "it cannot be the tokenizer the model was trained with. Use the model's own tokenizer.")
    return tok


def loading_options(cfg: ModelConfig, lora: LoraConfig | None = None, precision: str = "fp32") -> dict:
    """from_pretrained's keywords from model.*: revision, remote code, the dtype weights load in, attention; and
    for QLoRA (lora.load_in_4bit) the 4-bit quantization, computing in the run's precision, with the weights that
    stay unquantized (norms, embeddings, head) loaded in that dtype too unless model.dtype says otherwise."""
    options = {"revision": cfg.revision, **_config_options(cfg)}
    if lora is not None and lora.load_in_4bit:
        options["quantization_config"] = quantization(precision)
        options.setdefault("dtype", options["quantization_config"].bnb_4bit_compute_dtype)
    return options


def quantization(precision: str):
    """bitsandbytes NF4 with double quantization. The packed weights are stored in the compute dtype, so ZeRO-3
    can partition them like any other parameter."""
    import torch
    from transformers import BitsAndBytesConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def _config_options(cfg: ModelConfig) -> dict:
    import torch

    options = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.dtype:
        options["dtype"] = getattr(torch, cfg.dtype)
    if cfg.attn_implementation:
        options["attn_implementation"] = cfg.attn_implementation
    return options


def load_classifier(cfg: ModelConfig, label_names: list[str], pad_token_id: int | None = None,
                    lora: LoraConfig | None = None, precision: str = "fp32", zero3: bool = False, log=None):
    """AutoModelForSequenceClassification with a head for `label_names` (id2label/label2id in its config), any
    architecture (an encoder, or a decoder LLM that scores its last real token). With `lora` on, peft's
    sequence-classification task: adapters on the body, the new head trained in full and saved with them. `log`
    takes what the checkpoint lacked (the new head) in one line, instead of transformers' table."""
    name = locate(cfg.name_or_path, "model.name_or_path")
    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    common = loading_options(cfg, lora, precision)
    try:
        if cfg.from_scratch:
            config = read_config(cfg, **labels)
            model = AutoModelForSequenceClassification.from_config(config, **_config_options(cfg))
        else:
            # a checkpoint with another head size (e.g. a 2-class model tuned to 3 classes) gets a fresh head
            model = _from_pretrained(AutoModelForSequenceClassification, name, log, ignore_mismatched_sizes=True,
                                     **labels, **common)
    except (OSError, ValueError) as exc:
        raise _hub_error("the model", name, exc) from None
    if pad_token_id is not None:
        # decoder classifiers find the last real token through it, and it must be the id the tokenizer pads with
        # (a config may name another: a tokenizer without a pad token pads with eos)
        model.config.pad_token_id = pad_token_id
    model = _for_adapters(model, cfg, lora, zero3)
    return apply_lora(model, lora, "SEQ_CLS", precision, zero3) if lora is not None else model


def _for_adapters(model, cfg: ModelConfig, lora: LoraConfig | None, zero3: bool = False):
    """Gradient checkpointing, and what LoRA on a frozen (maybe 4-bit) base needs: inputs that carry gradients,
    and for 4-bit peft's k-bit preparation (norms in fp32, the checkpointing it wants). Under ZeRO-3 a 4-bit base
    keeps one dtype: ZeRO-3 flattens parameters of one dtype, and peft's preparation would upcast every weight
    that is not 4-bit to fp32 beside the 4-bit weights stored in the compute dtype."""
    four_bit = lora is not None and lora.load_in_4bit
    if four_bit and not zero3:
        from peft import prepare_model_for_kbit_training

        # its checkpointing is llmkit's call below: peft's uses the name transformers 5.25 deprecates
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        _checkpointing(model)
    if (four_bit and zero3) or (not four_bit and cfg.gradient_checkpointing and lora is not None and lora.enabled):
        model.enable_input_require_grads()  # a frozen base would cut the gradient path into the adapters
    return model


def _checkpointing(model) -> None:
    # non-reentrant checkpointing is the one that works with ZeRO-3; transformers 5 renamed the method
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _from_pretrained(auto, name: str, log=None, **options):
    """`auto.from_pretrained`; given `log`, what transformers' load report would say goes there in one line."""
    if log is None:
        return auto.from_pretrained(name, **options)
    with logs.without_load_report():
        model, info = auto.from_pretrained(name, output_loading_info=True, **options)
    if logs.load_report(info):
        log(logs.load_report(info))
    return model


def read_config(cfg: ModelConfig, **overrides):
    """The model's transformers config (a local dir, an asset or a Hub id): the one place that reads it."""
    name = locate(cfg.name_or_path, "model.name_or_path")
    try:
        return AutoConfig.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                          **overrides)
    except (OSError, ValueError) as exc:
        raise _hub_error("the model config", name, exc) from None


def hidden_size(config) -> int | None:
    """The hidden size of a model config, used to size DeepSpeed buckets."""
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def positions(config) -> int | None:
    """The longest sequence a model config allows, when it says."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_causal_lm(architectures: list[str] | None) -> bool:  # the one place an architecture's name is read
    return any(a.endswith("ForCausalLM") for a in architectures or [])  # e.g. LlamaForCausalLM


def is_classifier(architectures: list[str] | None) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in architectures or [])


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of a model as it trains (with its LoRA adapters, when on)."""
    params: int  # every parameter (tied weights once)
    largest: int  # elements of the largest single parameter
    trainable: int  # those that get gradients and optimizer states (LoRA: adapters and modules_to_save heads)
    largest_trainable: int
    quantized: int = 0  # elements QLoRA stores in 4 bits: the nn.Linear weights transformers hands bitsandbytes


def model_sizes(cfg: ModelConfig, causal_lm: bool = False, lora: LoraConfig | None = None) -> Sizes:
    """The model's parameter counts, built from its config on the meta device (no weights are read), with the
    LoRA adapters `lora` adds (peft on the meta device, as the run applies it)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = read_config(cfg)
    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
        quantized = _quantized_elements(model)
        if lora is not None and lora.enabled:
            model = apply_lora(model, lora, "CAUSAL_LM" if causal_lm else "SEQ_CLS")
    sizes = [(p.numel(), p.requires_grad) for p in model.parameters()]  # tied weights are yielded once
    trained = [n for n, grad in sizes if grad]
    return Sizes(sum(n for n, _ in sizes), max((n for n, _ in sizes), default=0), sum(trained),
                 max(trained, default=0), quantized)


def _quantized_elements(model) -> int:
    """Weight elements transformers' bitsandbytes quantizer makes 4-bit: each nn.Linear (and Conv1D) but those it
    keeps in the compute dtype (get_keys_to_not_convert: output embeddings, tied weights, the last module)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sum(module.weight.numel() for name, module in model.named_modules()
               if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def needs_trained_tokenizer(cfg: ModelConfig) -> bool:
    """From scratch, with no model.tokenizer and no tokenizer files next to the model config: train one."""
    if not cfg.from_scratch or cfg.tokenizer:
        return False
    path = Path(locate(cfg.name_or_path, "model.name_or_path"))
    return path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES)


def train_tokenizer(texts, vocab_size: int, folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (any byte sequence encodes: no unknown tokens), with
    <|endoftext|> as its BOS / EOS / pad token, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise LlmkitError(f"the model config's vocab_size {vocab_size} is too small for a byte-level BPE "
                          f"tokenizer (needs >= {len(alphabet) + 1}); raise vocab_size in the model config")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet,
                                  show_progress=False)
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_max_length=1_000_000)
    tok.save_pretrained(folder)
    return tok


def load_causal_lm(cfg: ModelConfig, lora: LoraConfig, tokenizer=None, precision: str = "fp32",
                   zero3: bool = False, log=None):
    """AutoModelForCausalLM from a Hub id, a local dir or an asset, or random init from its config; LoRA if asked.

    From scratch, the config's special-token ids are taken from `tokenizer` (it may have been trained here)."""
    from transformers import AutoModelForCausalLM

    name = locate(cfg.name_or_path, "model.name_or_path")
    common = loading_options(cfg, lora, precision)
    try:
        if cfg.from_scratch:
            config = read_config(cfg)
            if tokenizer is not None:
                if len(tokenizer) > config.vocab_size:
                    raise LlmkitError(f"the tokenizer has {len(tokenizer)} tokens but the model config's vocab_size "
                                      f"is {config.vocab_size}; raise vocab_size or use a smaller tokenizer")
                config.pad_token_id = tokenizer.pad_token_id
                config.eos_token_id = tokenizer.eos_token_id
                config.bos_token_id = tokenizer.bos_token_id
            model = AutoModelForCausalLM.from_config(config, **_config_options(cfg))
        else:
            model = _from_pretrained(AutoModelForCausalLM, name, log, **common)
    except (OSError, ValueError) as exc:
        raise _hub_error("the model", name, exc) from None
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = _for_adapters(model, cfg, lora, zero3)
    return apply_lora(model, lora, "CAUSAL_LM", precision, zero3)
