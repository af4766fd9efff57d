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
from . import IGNORE_INDEX
from .chat import tokenize_chats
from .prompts import build_prompt, build_target

logger = logging.getLogger(__name__)

MIN_MAX_LENGTH = 8  # the one lower bound on data.max_length (config validation and every tokeniser use it)


def check_max_length(max_length, key: str = "data.max_length") -> None:
    """UserError unless ``max_length`` is a whole number >= MIN_MAX_LENGTH."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < MIN_MAX_LENGTH:
        raise UserError(f"{key}={max_length!r} is too small; use a whole number >= {MIN_MAX_LENGTH} (e.g. 512)")


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


def _assemble(prefix: list[int], prompt_ids: list[int], full_ids: list[int], eos: int, max_length: int,
              train_on_prompt: bool = False) -> dict:
    input_ids = (prefix + list(full_ids) + [eos])[:max_length]
    masked = 0 if train_on_prompt else min(len(prefix) + len(prompt_ids), len(input_ids))
    labels = [IGNORE_INDEX] * masked + input_ids[masked:]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_rows(rows: list[dict], tokenizer, template: str, max_length: int) -> list[dict]:
    """Tokenise LLM-Adapters rows with ``template`` in two batched tokenizer calls.

    Examples with no target token left after truncation are dropped (logged); if nothing is
    left, that is a UserError naming data.max_length.
    """
    check_max_length(max_length)
    pairs = [(build_prompt(row, template), build_target(row, template)) for row in rows]
    return drop_untargeted(tokenize_pairs(pairs, tokenizer, max_length), max_length)


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer, max_length: int, train_on_prompt: bool = False) -> list[dict]:
    """(prompt, completion) pairs -> examples (two batched tokenizer calls); nothing dropped.

    ``train_on_prompt`` labels the prompt too (LLM-Adapters' train_on_inputs); by default it is masked.
    """
    check_max_length(max_length)
    if not pairs:
        return []
    prefix, eos = special_prefix_ids(tokenizer), _eos_id(tokenizer)
    prompt_ids = tokenizer([prompt for prompt, _ in pairs], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([prompt + target for prompt, target in pairs], add_special_tokens=False)["input_ids"]
    return [_assemble(prefix, p, f, eos, max_length, train_on_prompt) for p, f in zip(prompt_ids, full_ids)]


def tokenize_records(records: list[dict], tokenizer, max_length: int, train_on_prompt: bool = False) -> list[dict]:
    """Normalised records (data/formats.py: prompt/completion pairs or chat messages) -> examples, in order.

    Pairs go through ``tokenize_pairs``, conversations through the chat template (data/chat.py); examples
    without a target token left are dropped as in ``tokenize_rows``.
    """

    check_max_length(max_length)
    chats = [index for index, record in enumerate(records) if "messages" in record]
    pairs = [index for index, record in enumerate(records) if "messages" not in record]
    examples: list[dict | None] = [None] * len(records)
    chat_examples = tokenize_chats([records[i]["messages"] for i in chats], tokenizer, max_length, train_on_prompt)
    pair_examples = tokenize_pairs([(records[i]["prompt"], records[i]["completion"]) for i in pairs], tokenizer,
                                   max_length, train_on_prompt)
    for index, example in zip(chats + pairs, chat_examples + pair_examples):
        examples[index] = example
    return drop_untargeted(examples, max_length)


def drop_untargeted(examples: list[dict], max_length: int) -> list[dict]:
    """The examples that still have a target token (truncation may have cut all of it); logs how many went.

    UserError naming data.max_length when none is left (a 0/0 loss otherwise).
    """
    if not examples:
        return []
    kept = [example for example in examples if any(label != IGNORE_INDEX for label in example["labels"])]
    if not kept:
        raise UserError(
            f"data.max_length={max_length} leaves no target token in any of the {len(examples)} examples; raise it"
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


def common_prefix(a, b) -> int:
    """How many leading tokens two id sequences share (where a prompt's tokens end inside prompt + answer:
    tokenizers may merge across the boundary, so the shared prefix, not len(prompt), is what is conditioned on)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
