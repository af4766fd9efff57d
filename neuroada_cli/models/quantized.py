"""A frozen 4-bit or 8-bit base (``model.quantization``): bitsandbytes through transformers.

* ``check_quantization``: the value and the package, before anything loads (no import).
* ``import_bitsandbytes``: the package, its CPU-kernel warnings silenced (on a CPU it logs twice that it cannot
  fetch an optional kernel from the hub). Only quantized runs ever import it.
* ``quantization_config`` / ``quantized_device_map``: what ``from_pretrained`` gets. A quantized model is placed
  on its device at load and never moved afterwards (bitsandbytes would re-quantize or refuse).
* ``full_precision_weights``: the target layers' weights as the checkpoint stores them, read tensor by tensor
  from its safetensors files, so cells are chosen on the weights a bf16 run selects on (see methods/neuroada.py).
(The dequantized weight of a quantized layer: core.quantized.dequantized_weight.)

No torch/transformers/bitsandbytes at import time: config validation imports ``QUANTIZATIONS`` via models/.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "fp4", "int8")  # model.quantization: a frozen bitsandbytes base (null = none)
INSTALL_HINT = "pip install 'neuroada[quantization]' (or pip install bitsandbytes)"


def check_quantization(name: str | None) -> None:
    """UserError for an unknown value or a missing bitsandbytes; imports nothing."""
    if name is None:
        return
    if name not in QUANTIZATIONS:
        raise UserError(f"model.quantization={name!r} is unknown; use null, {', '.join(QUANTIZATIONS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantization={name} needs the bitsandbytes package: {INSTALL_HINT}")


def import_bitsandbytes():
    """bitsandbytes, imported with its "Failed to load CPU gemm_4bit_forward" warnings silenced."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:
        raise UserError(f"bitsandbytes cannot be imported ({str(err).splitlines()[0] if str(err) else 'ImportError'});"
                        f" {INSTALL_HINT}") from None
    finally:
        quiet.setLevel(level)
    # 8-bit matmuls on fp32/bf16 inputs log their fp16 cast on every call; the dtype is the user's choice.
    matmul = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotes) for f in matmul.filters):
        matmul.addFilter(_DropCastNotes())
    return bitsandbytes


class _DropCastNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quantization_config(name: str, dtype):
    """transformers' BitsAndBytesConfig for ``name``; 4-bit computes in ``dtype`` and stores in ``dtype``.

    Storage in the model dtype (bf16 in practice) packs the 4-bit codes into bf16 elements, so every parameter of
    the model has one dtype: what sharding wrappers need. Double quantization (the QLoRA recipe) also stores the
    block scales in 8 bits: 0.37 bits per weight less.
    """
    check_quantization(name)
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype, bnb_4bit_use_double_quant=True)


def quantized_device_map() -> dict:
    """Everything on this process's accelerator (LOCAL_RANK under DDP), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}
    return {"": "cpu"}


def keep_weights_in_place(model) -> None:
    """Turn off bitsandbytes' CPU repacking: on a CPU with AVX512-BF16, Linear4bit rewrites its weight in place
    into a CPU-only layout at the first inference forward, which dequantize_4bit cannot read (merging, selection
    on dequantized weights) and which fails outright on layers narrower than a quantization block (tiny models).
    The plain 4-bit kernels give the same products, slower on such CPUs only; GPUs never repack."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model) -> bool:
    """Whether ``model`` (or the model a PEFT wrapper holds) has a bitsandbytes base: it must not be moved."""
    for candidate in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        if candidate is not None and (getattr(candidate, "is_loaded_in_4bit", False)
                                      or getattr(candidate, "is_loaded_in_8bit", False)):
            return True
    return False


def packed_parameter_excess(model) -> int:
    """How many more parameters ``model`` has than ``numel`` counts: a 4-bit weight is stored packed (two codes
    per byte, in elements of the storage dtype), so its numel undercounts the weights it holds. Add this to a
    numel-based total to count the base's parameters as the full-precision model has them."""
    excess = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        shape = getattr(state, "shape", None)
        if shape is not None:
            logical = 1
            for size in shape:
                logical *= int(size)
            excess += logical - param.numel()
    return excess


def checkpoint_quantization(location: str | os.PathLike) -> dict | None:
    """The quantization_config a checkpoint folder was saved with (a pre-quantized checkpoint), else None."""
    config_file = Path(location) / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # transformers reports a damaged config itself when it loads


class CheckpointWeights(Mapping):
    """{layer name: weight} read lazily from safetensors files: each access reads one tensor from disk (memory
    mapped), casts it to ``dtype`` and keeps nothing, so selecting layer by layer never holds a second model."""

    def __init__(self, keys: dict[str, tuple[Path, str]], dtype):
        self._keys, self._dtype = keys, dtype

    def __getitem__(self, name: str):
        from safetensors import safe_open

        file, key = self._keys[name]
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key).to(self._dtype)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _safetensors_index(folder: Path) -> dict[str, Path]:
    """{tensor key: file} of a checkpoint folder's safetensors files (sharded or single); {} if it has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {key: folder / file for key, file in weight_map.items()}
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys.update({key: file for key in handle.keys()})
    return keys


def full_precision_weights(location: str | os.PathLike, layers: dict[str, tuple[int, int]], dtype,
                           prefix: str = "") -> CheckpointWeights | None:
    """The weights of ``layers`` ({module name: (d_out, d_in)}) as stored in the checkpoint at ``location``.

    None when there are none to read: a pre-quantized checkpoint, no safetensors files (a .bin checkpoint), or a
    layer whose weight is not stored under its module name with the expected shape (a renamed or fused tensor);
    then cells are chosen on the dequantized weights instead. ``prefix``: the model's base_model_prefix
    (``bert``), which checkpoints of the bare encoder leave out of their keys.
    """
    folder = Path(location)
    if not folder.is_dir():  # a hub id: its snapshot in the local HF cache, where from_pretrained just read it
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(location), local_files_only=True))
        except Exception:  # not cached as a snapshot (or not a hub id): nothing to read
            return None
    if checkpoint_quantization(folder) is not None:
        return None
    try:
        files = _safetensors_index(folder)
    except (OSError, ValueError) as err:
        logger.warning("cannot read the safetensors index of %s (%s): cells are chosen on the dequantized weights",
                       folder, type(err).__name__)
        return None
    if not files:
        return None
    from safetensors import safe_open

    found: dict[str, tuple[Path, str]] = {}
    for name, shape in layers.items():
        candidates = [f"{name}.weight"]
        if prefix and name.startswith(prefix + "."):
            candidates.append(f"{name[len(prefix) + 1:]}.weight")
        key = next((candidate for candidate in candidates if candidate in files), None)
        if key is None:
            logger.info("no full-precision weight for %s in %s: cells are chosen on the dequantized weights", name,
                        folder)
            return None
        with safe_open(str(files[key]), framework="pt", device="cpu") as handle:
            stored = tuple(handle.get_slice(key).get_shape())
        if stored != tuple(shape):
            logger.info("%s is stored as %s, not %s: cells are chosen on the dequantized weights", key, stored, shape)
            return None
        found[name] = (files[key], key)
    return CheckpointWeights(found, dtype)

