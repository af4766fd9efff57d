"""Base models: where they come from (cache.py: embedded packages, local directories, hub ids, the GGUF
cache), how they are loaded (loading.py: dtype, attention, pad policy) and quantized (quantized.py: bitsandbytes
bases and the full-precision weights behind them). No torch/transformers/bitsandbytes at import time."""
from .cache import CACHE_MARKER, EMBEDDED_MODELS, EMBEDDED_PREFIX, ModelSource, cached_checkpoint, resolve_model_source
from .loading import (ATTN_IMPLEMENTATIONS, DTYPES, FAMILIES, apply_pad_policy, check_attn_implementation, detect_family,
                      drop_quantization, forward_accepts, load_model_and_tokenizer, torch_dtype)
from .quantized import QUANTIZATIONS, check_quantization, full_precision_weights, import_bitsandbytes, is_quantized

__all__ = [
    "ATTN_IMPLEMENTATIONS", "CACHE_MARKER", "DTYPES", "EMBEDDED_MODELS", "EMBEDDED_PREFIX", "FAMILIES", "ModelSource", "QUANTIZATIONS",
    "apply_pad_policy", "cached_checkpoint", "check_attn_implementation", "check_quantization",
    "detect_family", "drop_quantization", "forward_accepts", "full_precision_weights", "import_bitsandbytes",
    "is_quantized", "load_model_and_tokenizer", "resolve_model_source", "torch_dtype",
]
