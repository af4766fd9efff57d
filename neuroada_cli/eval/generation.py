"""Batched greedy generation: left padding, KV cache, length-sorted batches, original order restored.

Greedy decoding is what the authors' harness uses (``do_sample=False``, 32 new tokens for the
commonsense suite, 512 for arithmetic, stop at the tokenizer's eos). Batching must not change a
single token compared with batch size 1, so:

* prompts are tokenised exactly like training does it (the tokenizer's own special prefix such as
  Llama's bos, then the text without special tokens; see ``data/tokenize.py``);
* batches are LEFT padded with an attention mask; ``generate`` derives position ids from the mask,
  so a padded prompt sees the same positions as an unpadded one;
* prompts are sorted longest first, so each batch holds prompts of similar length (less padding,
  and the first batch shows the peak memory at once), and outputs are put back in input order;
* every sequence is cut at its first eos; what ``generate`` appends after that is padding.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.tokenize import special_prefix_ids
from ..errors import UserError


def pad_token_id(tokenizer) -> int:
    """The pad id for batching (falls back to eos; padded positions are masked anyway)."""
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if value is None:
        raise UserError("the tokenizer has neither a pad nor an eos token; generation-based eval needs one")
    return int(value)


def eos_token_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token; generation-based eval needs one to stop")
    return int(tokenizer.eos_token_id)


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids as the training code builds them: the tokenizer's special prefix + the plain text ids."""
    if not texts:
        return []
    prefix = special_prefix_ids(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [prefix + list(ids) for ids in encoded]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the left to the longest sequence."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first (stable for equal lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def _generation_config(max_new_tokens: int, pad_id: int, eos_id: int):
    from transformers import GenerationConfig

    # A fresh config: the model's own generation_config may carry sampling defaults (temperature,
    # top_p) that must not leak into greedy decoding.
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
        eos_token_id=eos_id, use_cache=True,
    )


def generate_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, eos and everything after it removed), in input order."""
    if not prompt_ids:
        return []
    if any(len(ids) == 0 for ids in prompt_ids):
        raise UserError("an eval prompt tokenised to zero tokens; check the data file")
    pad_id, eos_id = pad_token_id(tokenizer), eos_token_id(tokenizer)
    config = _generation_config(max_new_tokens, pad_id, eos_id)
    device = next(model.parameters()).device
    outputs: list[list[int] | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in length_sorted_batches([len(ids) for ids in prompt_ids], batch_size):
                input_ids, attention_mask = left_pad([prompt_ids[i] for i in batch], pad_id, device)
                generated = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
                new_tokens = generated[:, input_ids.shape[1]:].tolist()
                for row, index in enumerate(batch):
                    outputs[index] = _cut_at_eos(new_tokens[row], eos_id)
                if advance is not None:
                    advance(len(batch))
    finally:
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy generations decoded without special tokens (as the authors decode), in input order."""
    ids = generate_ids(
        model, tokenizer, encode(tokenizer, prompts), max_new_tokens=max_new_tokens,
        batch_size=batch_size, advance=advance,
    )
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
