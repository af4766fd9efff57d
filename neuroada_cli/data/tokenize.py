"""Prompt/target pairs -> token ids with the loss on the target only, and right-padded batches.

Layout of one example (LLM-Adapters' ``generate_and_tokenize_prompt`` with train_on_inputs=False):

    [bos?] prompt tokens ............ target tokens ... eos
    labels: -100 ... -100 ..........  target ids ...... eos id

* bos: added exactly when the tokenizer adds one by itself (Llama does, SmolLM2 does not).
  It is found by probing the tokenizer once, so no model-specific code is needed here.
* prompt length: the prompt is tokenised on its own and its token count masks the start of the
  full text (as LLM-Adapters does). Tokenising prompt and target separately and concatenating
  would change how the boundary is tokenised compared with inference.
* truncation keeps the start (the prompt) and cuts the end, as LLM-Adapters' ``cutoff_len``; a
  cut example loses its eos. ``tokenize_rows`` drops examples cut so short that no target token
  is left (they would contribute 0/0 to the loss) and logs how many.
* padding (``collate_causal``): labels of padded positions are -100 because the attention mask
  says so, never because a token equals the pad id: SmolLM2's pad *is* its eos, and the eos
  that ends every target must keep its label.
"""
from __future__ import annotations

import logging

from ..errors import UserError
from .prompts import build_prompt, build_target

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def special_prefix_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts before the text by itself (e.g. Llama's bos), found by a probe.

    Eval code builds prompts as ``special_prefix_ids(tok) + tok(text, add_special_tokens=False)``
    so that they match training exactly.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token; causal-LM training needs one (pick a causal LM model)")
    return int(tokenizer.eos_token_id)


def _assemble(prefix: list[int], prompt_ids: list[int], full_ids: list[int], eos: int, max_length: int) -> dict:
    input_ids = (prefix + list(full_ids) + [eos])[:max_length]
    masked = min(len(prefix) + len(prompt_ids), len(input_ids))
    labels = [IGNORE_INDEX] * masked + input_ids[masked:]
    return {"input_ids": input_ids, "labels": labels}


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"data.max_length={max_length!r} is too small; use an integer >= 2 (e.g. 512)")


def tokenize_example(tokenizer, prompt: str, target: str, max_length: int) -> dict:
    """One example: ``{"input_ids": [...], "labels": [...]}`` (lists of ints, same length)."""
    _check_max_length(max_length)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
    return _assemble(special_prefix_ids(tokenizer), prompt_ids, full_ids, _eos_id(tokenizer), max_length)


def tokenize_rows(rows: list[dict], tokenizer, template: str, max_length: int) -> list[dict]:
    """Tokenise LLM-Adapters rows with ``template`` in two batched tokenizer calls.

    Examples with no target token left after truncation are dropped (logged); if nothing is
    left, that is a UserError naming data.max_length.
    """
    _check_max_length(max_length)
    if not rows:
        return []
    prompts = [build_prompt(row, template) for row in rows]
    fulls = [prompt + build_target(row, template) for prompt, row in zip(prompts, rows)]
    prefix, eos = special_prefix_ids(tokenizer), _eos_id(tokenizer)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    examples = [_assemble(prefix, p, f, eos, max_length) for p, f in zip(prompt_ids, full_ids)]
    kept = [example for example in examples if any(label != IGNORE_INDEX for label in example["labels"])]
    if not kept:
        raise UserError(
            f"data.max_length={max_length} leaves no target token in any of the {len(rows)} examples; raise it"
        )
    if len(kept) < len(examples):
        logger.warning("dropped %d of %d examples whose target was cut off by data.max_length=%d",
                       len(examples) - len(kept), len(examples), max_length)
    return kept


def collate_causal(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of tokenised examples into tensors ``input_ids``, ``attention_mask``, ``labels``.

    Padding gets label -100 from the attention mask (see module docstring), so ``pad_id`` may equal eos.
    """
    import torch

    if not examples:
        raise ValueError("collate_causal needs at least one example")
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example["labels"], dtype=torch.long)
    # The invariant the loss relies on: nothing outside the mask is ever supervised.
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
