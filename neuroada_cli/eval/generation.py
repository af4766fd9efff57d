"""Batched greedy generation: left padding, KV cache, length-sorted batches, original order restored.

Greedy decoding is what the authors' harness uses (``do_sample=False``, 32 new tokens for the
commonsense suite, 512 for arithmetic, stop at the tokenizer's eos). Batching must not change a
single token compared with batch size 1, so:

* prompts are tokenised exactly like training does it (the tokenizer's own special prefix such as
  Llama's bos, then the text without special tokens; see ``data/tokenize.py``);
* batches are LEFT padded with an attention mask and explicit position ids derived from it, so a
  padded prompt sees the same positions as an unpadded one;
* prompts are sorted longest first, so each batch holds prompts of similar length (less padding,
  and the first batch shows the peak memory at once), and outputs are put back in input order;
* the decode loop is our own (KV cache, only the last position projected onto the vocabulary): a
  row that emits eos leaves the batch at once, its cache rows dropped, so the few answers that run
  to the token limit do not make every finished row in their batch pay for each further step
  (``model.generate`` keeps computing finished rows until the whole batch is done).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # torch is imported inside the functions: `neuroada ls` lists these tasks without it
    import torch

from ..data.batching import length_sorted_batches
from ..data.tokenize import special_prefix_ids
from ..errors import UserError
from ..models import forward_accepts


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
    import torch

    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _greedy_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  eos_id: int) -> list[list[int]]:
    """Greedy continuations of one left-padded batch (eos excluded); finished rows leave the batch."""
    import torch

    from transformers import DynamicCache

    outputs: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    live = list(range(input_ids.shape[0]))  # original row of each row still in the batch
    cache = DynamicCache(config=model.config)
    keep_last = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    # transformers 5.x renamed the forward's cache argument; older models still take past_key_values
    cache_arg = "cache" if forward_accepts(model, "cache") else "past_key_values"
    mask = attention_mask
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    step_ids = input_ids
    for step in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_arg: cache}, **keep_last).logits[:, -1]
        next_ids = logits.argmax(-1)
        unfinished = []
        for row, (original, token) in enumerate(zip(live, next_ids.tolist())):
            if token != eos_id:
                outputs[original].append(token)
                unfinished.append(row)
        if not unfinished or step == max_new_tokens - 1:
            break
        if len(unfinished) < len(live):
            rows = torch.tensor(unfinished, device=input_ids.device)
            cache.batch_select_indices(rows)
            live = [live[row] for row in unfinished]
            mask, positions, next_ids = mask[rows], positions[rows], next_ids[rows]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1
        step_ids = next_ids.unsqueeze(1)
    return outputs


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
    import torch

    if not prompt_ids:
        return []
    if any(len(ids) == 0 for ids in prompt_ids):
        raise UserError("an eval prompt tokenised to zero tokens; check the data file")
    pad_id, eos_id = pad_token_id(tokenizer), eos_token_id(tokenizer)
    device = next(model.parameters()).device
    outputs: list[list[int] | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in length_sorted_batches([len(ids) for ids in prompt_ids], batch_size):
                input_ids, attention_mask = left_pad([prompt_ids[i] for i in batch], pad_id, device)
                continuations = _greedy_batch(model, input_ids, attention_mask, max_new_tokens, eos_id)
                for index, tokens in zip(batch, continuations):
                    outputs[index] = tokens
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
