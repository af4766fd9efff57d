"""Quantized base layers (bitsandbytes Linear4bit nf4/fp4, Linear8bitLt): detection and dequantized weights.

A quantized W can be neither read at a cell nor written, so NeuroAda runs unmerged on it (layer.py). The cells
and the original values come from outside (``inject(..., weights=...)``: the full-precision weights read before
quantizing) or, with only a quantized checkpoint, from the dequantized weight below; selection then breaks ties
(4-bit values repeat a lot: 16 levels per block) towards the lower column, the rule of every selection here.
Nothing here imports bitsandbytes unless a quantized layer is actually met.
"""
from __future__ import annotations

# The fingerprint of an adapter is taken on the full-precision base; against dequantized values (a quantized
# base loaded without its full-precision weights) the sums differ by the quantization error, so the check is
# looser there (nf4: about 1e-2 relative on SmolLM2; this still rejects another model, whose sums differ ~1x).
QUANTIZED_FINGERPRINT_RTOL = 0.1


def is_quantized(module) -> bool:
    """True for a bitsandbytes linear layer (checked by class module name: imports nothing)."""
    return type(module).__module__.split(".")[0] == "bitsandbytes"


def quantization_kind(module) -> str | None:
    """nf4 | fp4 | int8 for a bitsandbytes layer, None otherwise."""
    if not is_quantized(module):
        return None
    state = getattr(module.weight, "quant_state", None)
    return getattr(state, "quant_type", None) or "int8"


def dequantized_weight(module):
    """The layer's weight as fp32 [out_features, in_features]; a plain nn.Linear's own weight, detached."""

    weight = module.weight
    if not is_quantized(module):
        return weight.detach().float()
    state = getattr(weight, "quant_state", None)
    if state is not None:  # Linear4bit: packed 4-bit values with per-block absmax
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, state).float().reshape(module.out_features,
                                                                                 module.in_features)
    scale = getattr(weight, "SCB", None)
    if scale is None:  # Linear8bitLt before quantization (still holds the fp16 values)
        return weight.detach().float()
    return weight.data.float() * (scale.float().unsqueeze(1) / 127.0)  # int8 rows scaled by their absmax


def check_weight_shape(weight, module, name: str):
    from ..errors import UserError

    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected:
        raise UserError(f"weights[{name!r}] has shape {tuple(weight.shape)} but layer {name!r} is {expected}; "
                        "pass the full-precision weight of that layer (read before quantizing)")
    return weight
