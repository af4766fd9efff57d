"""Base models: where they come from (cache.py: embedded packages, local directories, hub ids, the GGUF
cache) and how they are loaded (loading.py: dtype, attention, pad policy)."""
from .cache import CACHE_MARKER, EMBEDDED_MODELS, EMBEDDED_PREFIX, ModelSource, cached_checkpoint, resolve_model_source
from .loading import (ATTN_IMPLEMENTATIONS, DTYPES, FAMILIES, QUANTIZATIONS, apply_pad_policy, check_attn_implementation, detect_family,
                      drop_quantization, forward_accepts, load_model_and_tokenizer, torch_dtype)

__all__ = [
    "ATTN_IMPLEMENTATIONS", "CACHE_MARKER", "DTYPES", "EMBEDDED_MODELS", "EMBEDDED_PREFIX", "FAMILIES", "ModelSource", "QUANTIZATIONS",
    "apply_pad_policy", "cached_checkpoint", "check_attn_implementation", "detect_family", "drop_quantization",
    "forward_accepts", "load_model_and_tokenizer", "resolve_model_source", "torch_dtype",
]
