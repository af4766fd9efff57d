"""Chat conversations -> token ids, rendered with the tokenizer's chat template, loss on the assistant turns.

Which tokens belong to an assistant turn is found without knowing the template: the conversation is rendered
prefix by prefix. For the assistant message at position i,

    render(messages[:i], add_generation_prompt=True)   ends where the assistant starts writing,
    render(messages[:i + 1])                            ends after its reply and end-of-turn token,

and both must be text prefixes of the whole rendering (templates that rewrite earlier turns, e.g. ones that drop
past reasoning, are refused with a one-line error). The character span between the two ends, less trailing
whitespace (the newline a template writes after the end-of-turn token is formatting, not reply), is mapped to
tokens through the fast tokenizer's offsets: a token is supervised when it overlaps a reply (a token that merges
the template's trailing space with the reply's first word is part of what the model must write). Working on
characters rather than on separately tokenised prefixes is immune to tokens that merge across the boundary. The template writes its own bos and end-of-turn tokens; nothing is added here.

SmolLM2-Instruct: ``<|im_start|>assistant\\n`` is the prompt, ``Hello there<|im_end|>`` is supervised, the
``\\n`` after it is not (tests/test_data_formats.py checks this token by token).
"""
from __future__ import annotations

from ..errors import UserError, one_line
from . import IGNORE_INDEX


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises its own types (e.g. a template that demands alternating roles)
        raise UserError(f"the tokenizer's chat template cannot render this conversation "
                        f"({one_line(err, 200)}); fix the data's roles")\
            from None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, character spans [start, end) of its assistant replies)."""
    text = _render(tokenizer, messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True) if index else ""
        through = _render(tokenizer, messages[:index + 1], False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise UserError("the tokenizer's chat template does not render a conversation prefix by prefix (it "
                            "rewrites earlier turns), so assistant tokens cannot be located; use data.format="
                            "prompt_completion or a model whose template keeps past turns")
        end = max(len(before), len(through.rstrip()))
        spans.append((len(before), end))
    return text, spans


def check_chat_tokenizer(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("chat data needs a tokenizer with a chat template, and this model's has none; use an "
                        "instruct/chat model or alpaca / prompt_completion data")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("chat data needs a fast tokenizer (offsets locate the assistant tokens); use a model with a "
                        "tokenizer.json")


def tokenize_chats(conversations: list[list[dict]], tokenizer, max_length: int,
                   train_on_prompt: bool = False) -> list[dict]:
    """One example per conversation: ``{"input_ids", "labels"}``, cut to ``max_length`` (the start is kept).

    Labels are the token ids inside assistant replies (every token with ``train_on_prompt``), else -100.
    """
    if not conversations:
        return []
    check_chat_tokenizer(tokenizer)
    rendered = [assistant_spans(tokenizer, messages) for messages in conversations]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        ids = list(ids)[:max_length]
        labels = []
        for token, (start, end) in zip(ids, offsets):
            inside = train_on_prompt or any(start < high and end > low for low, high in spans)
            labels.append(int(token) if inside else IGNORE_INDEX)
        examples.append({"input_ids": ids, "labels": labels})
    return examples
