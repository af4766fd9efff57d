"""Batched generation equals batch size 1 token for token; log-likelihoods equal a hand computation."""
from __future__ import annotations

import pytest
import torch

from helpers import make_tokenizer, tiny_llama
from neuroada_cli.data.batching import length_sorted_batches
from neuroada_cli.errors import UserError
from neuroada_cli.eval.generation import encode, generate_ids, generate_texts, left_pad
from neuroada_cli.eval.loglik import plan_rows, choose, score_continuations

PROMPTS = [
    "the quick brown fox",
    "Please choose the correct answer to the question: the correct answer is",
    "a",
    "### Instruction: ### Response: The answer is 12. 3 + 4 = 7",
    "the lazy dog; a man is playing a guitar. entailment",
    "Below is an instruction that describes a task.",
    "solution1 solution2",
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)  # fp32


def test_length_sorted_batches_cover_every_index_longest_first():
    batches = length_sorted_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_left_pad_aligns_sequences_right():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _plain_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by hand: one unpadded prompt, full forward each step, no eos, no cache."""
    sequence = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(steps):
            next_id = model(sequence).logits[0, -1].argmax()
            sequence = torch.cat([sequence, next_id.view(1, 1)], dim=1)
    return sequence[0, len(ids):].tolist()


def test_batched_greedy_generation_matches_batch_size_one(model):
    tokenizer = make_tokenizer()
    tokenizer.eos_token = "<s>"  # an eos this model never emits here, so all rows run 12 steps
    ids = encode(tokenizer, PROMPTS)
    assert len({len(x) for x in ids}) > 3  # really different lengths, so left padding is exercised
    single = generate_ids(model, tokenizer, ids, max_new_tokens=12, batch_size=1)
    assert single == [_plain_greedy(model, x, 12) for x in ids]
    for batch_size in (3, len(PROMPTS)):
        assert generate_ids(model, tokenizer, ids, max_new_tokens=12, batch_size=batch_size) == single


def test_generation_stops_each_sequence_at_its_eos(model):
    tokenizer = make_tokenizer()
    ids = encode(tokenizer, PROMPTS)
    free = [_plain_greedy(model, x, 12) for x in ids]
    # Make a token the model emits mid-way in some continuations the eos, so rows stop at different steps.
    candidates = [token for seq in free for token in seq[1:10]]
    eos = max(set(candidates), key=candidates.count)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    expected = [seq[: seq.index(eos)] if eos in seq else seq for seq in free]
    assert any(len(seq) < 12 for seq in expected) and any(len(seq) > 2 for seq in expected)
    assert generate_ids(model, tokenizer, ids, max_new_tokens=12, batch_size=1) == expected
    assert generate_ids(model, tokenizer, ids, max_new_tokens=12, batch_size=4) == expected
    rows_per_forward = []  # one batch of all prompts: its row count may only shrink as rows finish
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: rows_per_forward.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        assert generate_ids(model, tokenizer, ids, max_new_tokens=12, batch_size=len(ids)) == expected
    finally:
        hook.remove()
    assert rows_per_forward[0] == len(ids) and min(rows_per_forward) < len(ids)
    texts = generate_texts(model, tokenizer, PROMPTS[:2], max_new_tokens=12, batch_size=2)
    assert texts == tokenizer.batch_decode(expected[:2], skip_special_tokens=True)


def _hand_loglik(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    """Sum of log P(continuation token | everything before) from ONE unpadded forward."""
    prompt_ids = encode(tokenizer, [prompt])[0]
    full = encode(tokenizer, [prompt + continuation])[0]
    start = 0
    while start < len(prompt_ids) and prompt_ids[start] == full[start]:
        start += 1
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    return sum(logprobs[t - 1, full[t]].item() for t in range(start, len(full))), len(full) - start


CHOICES = [
    ("Please answer with true or false: is the fox quick?\n", ["true", "false"]),
    ("Please choose the correct solution to the question: a man\n", ["solution1", "solution2"]),
    ("the lazy dog\n", ["answer1", "answer2", "answer3", "answer4"]),
    ("x\n", ["option1", "option2 and more words"]),
]


def test_loglik_matches_a_hand_computed_sum(model, tiny_tokenizer):
    prompts = [p for p, _ in CHOICES]
    continuations = [["the correct answer is " + c for c in cands] for _, cands in CHOICES]
    scores = score_continuations(model, tiny_tokenizer, prompts, continuations, batch_size=3)
    for prompt, conts, got in zip(prompts, continuations, scores):
        for continuation, (total, n) in zip(conts, got):
            hand_total, hand_n = _hand_loglik(model, tiny_tokenizer, prompt, continuation)
            assert n == hand_n
            assert total == pytest.approx(hand_total, abs=1e-4)


def test_loglik_shared_forward_equals_one_row_per_candidate(model, tiny_tokenizer):
    prompts = [p for p, _ in CHOICES]
    continuations = [["the correct answer is " + c for c in cands] for _, cands in CHOICES]
    prompt_ids = encode(tiny_tokenizer, prompts)
    full_ids = [encode(tiny_tokenizer, [p + c for c in conts]) for p, conts in zip(prompts, continuations)]
    shared_rows, _ = plan_rows(prompt_ids, full_ids, share=True)
    plain_rows, _ = plan_rows(prompt_ids, full_ids, share=False)
    assert len(plain_rows) == sum(len(c) for c in continuations)
    assert len(shared_rows) < len(plain_rows)  # at least one example needed a single forward
    shared = score_continuations(model, tiny_tokenizer, prompts, continuations, batch_size=4)
    plain = score_continuations(model, tiny_tokenizer, prompts, continuations, batch_size=1, share_prefix=False)
    for a, b in zip(shared, plain):
        for (ta, na), (tb, nb) in zip(a, b):
            assert na == nb and ta == pytest.approx(tb, abs=1e-4)


def test_loglik_reports_progress_per_example(model, tiny_tokenizer):
    seen = []
    prompts = [p for p, _ in CHOICES]
    continuations = [["the correct answer is " + c for c in cands] for _, cands in CHOICES]
    score_continuations(model, tiny_tokenizer, prompts, continuations, batch_size=2, advance=seen.append)
    assert sum(seen) == len(prompts)


def test_choose_sum_versus_per_token_mean():
    scores = [(-6.0, 3), (-5.0, 1)]           # sums: -6 < -5 ; means: -2 > -5
    assert choose(scores, normalize=False) == 1
    assert choose(scores, normalize=True) == 0
    assert choose([(-1.0, 1), (-1.0, 1)], normalize=False) == 0  # ties -> first candidate


def test_loglik_rejects_examples_without_candidates(model, tiny_tokenizer):
    with pytest.raises(UserError):
        score_continuations(model, tiny_tokenizer, ["a"], [[]], batch_size=1)
