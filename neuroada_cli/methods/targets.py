"""``target_modules`` values shared by NeuroAda and LoRA: a list of layer names, or ``all-linear``.

``all-linear`` means every ``nn.Linear`` of the model except its output head, PEFT's notion of the same
shorthand: the output embeddings (``lm_head``) of a causal LM, and the classification head (the ``score`` or
``classifier`` module) of a sequence classifier. One deliberate difference from PEFT: every Linear *inside* the
classification head is left out too (RoBERTa's ``classifier.dense``/``out_proj``; PEFT would adapt those),
because that head is new, randomly initialised and trained fully (``modules_to_save``), not adapted.

No torch at import time: config validation imports ``check_target_modules``.
"""
from __future__ import annotations

import re

from ..errors import UserError

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("score", "classifier")  # sequence-classification heads (PEFT's SEQ_CLS_HEAD_NAMES)


def is_all_linear(value) -> bool:
    """True for ``all-linear`` written as a string or as a one-item list (both spellings work in a config)."""
    if isinstance(value, str):
        return value.lower() == ALL_LINEAR
    items = list(value) if value is not None else []
    return len(items) == 1 and isinstance(items[0], str) and items[0].lower() == ALL_LINEAR


def check_target_modules(value, key: str) -> None:
    """UserError unless ``value`` is all-linear or a non-empty list of non-empty names."""
    if is_all_linear(value):
        return
    if isinstance(value, str) or not value or not all(isinstance(item, str) and item for item in value):
        raise UserError(f"{key}={value!r} is not valid; give a list of linear layer names (e.g. [q_proj, v_proj]) "
                        f"or {ALL_LINEAR}")


def _head_prefixes(model) -> list[str]:
    """Names of the output head modules (see the module docstring)."""
    modules = {id(module): name for name, module in model.named_modules()}
    heads = []
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and id(output) in modules:
        heads.append(modules[id(output)])
    for attribute in HEAD_NAMES:
        head = getattr(model, attribute, None)
        if head is not None and id(head) in modules:
            heads.append(modules[id(head)])
    return heads


def all_linear_targets(model) -> list[str]:
    """The target_modules list that ``all-linear`` stands for on ``model``.

    Short last-name components (``q_proj``) when they pick exactly those layers, else one escaped full-name
    pattern per layer (needed when a head layer shares a last name with a body layer, e.g. BERT's ``dense``).
    """
    import torch.nn as nn

    heads = _head_prefixes(model)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    targets = [name for name in linear if not any(name == h or name.startswith(h + ".") for h in heads)]
    if not targets:
        raise UserError("target_modules=all-linear found no nn.Linear outside the output head of this model")
    excluded_last = {name.rsplit(".", 1)[-1] for name in linear if name not in targets}
    last = sorted({name.rsplit(".", 1)[-1] for name in targets})
    if not excluded_last & set(last):
        return last
    return [re.escape(name) for name in targets]


def resolve_targets(value, model) -> list[str]:
    """``value`` as a plain list of names, with all-linear expanded for ``model``."""
    return all_linear_targets(model) if is_all_linear(value) else list(value)
