"""The adapter file's names and checks, without PEFT: key layout, index dtype, the base fingerprint.

``save_adapter`` / ``load_adapter`` (adapter.py) and the PEFT tuner (peft_tuner.py) share these, so the two
faces write and read one format; keeping them here lets the inject face save and load without importing peft
(which imports transformers and bitsandbytes).
"""
from __future__ import annotations

import hashlib

import torch

from ..errors import UserError

PEFT_TYPE_NAME = "NEUROADA"
PEFT_KEY_PREFIX = "base_model.model."
FINGERPRINT_RTOL = 5e-3  # tolerates a base reloaded in another dtype (bf16 rounding), not another model
# PeftConfig's own fields, as PeftConfig.save_pretrained writes them for a NeuroAda adapter (a test checks that
# adapter_config_dict matches NeuroAdaPeftConfig(...).to_dict() field for field).
PEFT_CONFIG_FIELDS = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                      "revision", "inference_mode")


def fingerprint(orig: torch.Tensor) -> torch.Tensor:
    """Sum, |sum| and sum of squares of the original selected values, in float64."""
    values = orig.detach().double().cpu()
    return torch.stack([values.sum(), values.abs().sum(), values.square().sum()])


def fingerprint_matches(expected: torch.Tensor, got: torch.Tensor, rtol: float | None = None) -> bool:
    rtol = FINGERPRINT_RTOL if rtol is None else rtol
    expected, got = [float(v) for v in expected], [float(v) for v in got]
    scale, square = max(expected[1], 1e-12), max(expected[2], 1e-12)
    return (abs(got[0] - expected[0]) <= rtol * scale
            and abs(got[1] - expected[1]) <= rtol * scale
            and abs(got[2] - expected[2]) <= rtol * square)


def index_dtype(d_in: int) -> torch.dtype:
    return torch.int16 if d_in <= torch.iinfo(torch.int16).max else torch.int32


def wrong_base_error(where: str, layer_name: str) -> UserError:
    return UserError(f"adapter {where!r} was made for another base model (weights of layer {layer_name!r} differ); "
                     "load it onto the model it was trained on")


def base_digest(origs: dict[str, torch.Tensor]) -> str:
    """A short id of the base (bf16-rounded selected values), shown in messages and run records."""
    digest = hashlib.sha256()
    for name in sorted(origs):
        digest.update(name.removeprefix(PEFT_KEY_PREFIX).encode())
        digest.update(origs[name].detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_config_dict(config, base_model: str | None, base_fingerprint: str | None) -> dict:
    """adapter_config.json's content for a NeuroAdaConfig, exactly as NeuroAdaPeftConfig.save_pretrained writes it."""
    from importlib import metadata

    try:
        peft_version = metadata.version("peft")
    except metadata.PackageNotFoundError:  # pragma: no cover (peft is a dependency)
        peft_version = None
    values = config.to_dict()
    values["modules_to_save"] = values["modules_to_save"] or None
    return {"task_type": None, "peft_type": PEFT_TYPE_NAME, "auto_mapping": None, "peft_version": peft_version,
            "base_model_name_or_path": base_model, "revision": None, "inference_mode": True, **values,
            "base_fingerprint": base_fingerprint}
