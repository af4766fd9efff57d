"""The data formats a training file may be in, and their normalised records.

Every format becomes one of two record shapes, which the tokenisers take:

* ``{"prompt": str, "completion": str}``: the loss covers the completion (+ eos), unless train_on_prompt;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template, the loss
  covers the assistant turns (see data/chat.py).

Formats (``data.format``):

* ``alpaca``: ``instruction``, optional ``input``, ``output``; the prompt is the Alpaca template.
* ``prompt_completion``: ``prompt`` and ``completion``, joined as they are (the file decides the spacing).
* ``chat``: ``messages`` (``role``/``content``), or ShareGPT ``conversations`` (``from``/``value``; human → user,
  gpt → assistant); a ``system`` column, when present, becomes the first turn.
* ``llm_adapters``: ``instruction``/``input``/``output``/``answer`` rows with the task's prompt template
  (``task.template``), exactly as the LLM-Adapters training sets.
* ``auto``: decided from the columns in that order: messages or conversations → chat, prompt + completion →
  prompt_completion, instruction + output + answer → llm_adapters, instruction + output → alpaca.
"""
from __future__ import annotations

from ..errors import UserError
from .prompts import build_prompt, build_target

FORMATS = ("auto", "alpaca", "prompt_completion", "chat", "llm_adapters")
_COLUMNS = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
            "llm_adapters": ("instruction", "output"), "chat": ("messages",)}
# ShareGPT and other common speaker names -> chat-template roles
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
              "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool",
              "function": "tool", "observation": "tool"}


def check_format(data_format: str) -> None:
    if data_format not in FORMATS:
        raise UserError(f"data.format={data_format!r} is unknown; use one of {', '.join(FORMATS)}")


def detect_format(rows: list[dict], label: str) -> str:
    """The format of a table from its columns (the first row's keys: ``datasets`` gives every row all columns)."""
    columns = set(rows[0]) if rows else set()
    if columns & {"messages", "conversations"}:
        return "chat"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"instruction", "output", "answer"} <= columns:
        return "llm_adapters"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    raise UserError(
        f"{label}: cannot tell the data format from its columns ({', '.join(sorted(map(str, columns))) or 'none'}); "
        "use instruction/output (alpaca), prompt/completion, messages or conversations (chat), or set data.format")


def to_records(rows: list[dict], data_format: str, label: str, template: str = "commonsense") -> list[dict]:
    """Normalised records of ``rows`` (see the module docstring); ``template`` serves ``llm_adapters`` only."""
    check_format(data_format)
    if data_format == "auto":
        data_format = detect_format(rows, label)
    _check_columns(rows, data_format, label)
    if data_format == "chat":
        return [{"messages": chat_messages(row, number, label)} for number, row in enumerate(rows, 1)]
    records = []
    for number, row in enumerate(rows, 1):
        if data_format == "prompt_completion":
            records.append({"prompt": _text(row, "prompt", number, label),
                            "completion": _text(row, "completion", number, label)})
            continue
        plain = {"instruction": _text(row, "instruction", number, label), "output": _text(row, "output", number, label),
                 "input": _text(row, "input", number, label, required=False)}
        used = "alpaca" if data_format == "alpaca" else template
        records.append({"prompt": build_prompt(plain, used), "completion": build_target(plain, used)})
    return records


def _check_columns(rows: list[dict], data_format: str, label: str) -> None:
    columns = set(rows[0]) if rows else set()
    if data_format == "chat":
        if not columns & {"messages", "conversations"}:
            raise UserError(f"{label}: data.format=chat needs a 'messages' (or ShareGPT 'conversations') column; "
                            f"it has {', '.join(sorted(map(str, columns)))}")
        return
    missing = [column for column in _COLUMNS[data_format] if column not in columns]
    if missing:
        raise UserError(f"{label}: data.format={data_format} needs column(s) {', '.join(missing)}; it has "
                        f"{', '.join(sorted(map(str, columns)))} (fix the file or set data.format)")


def _text(row: dict, column: str, number: int, label: str, required: bool = True) -> str:
    value = row.get(column)
    if value is None and not required:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        need = "text" if required else "text or empty"
        raise UserError(f"{label}: row {number} has no {need} in column {column!r} (got {type(value).__name__}); "
                        "fix or remove that row")
    return str(value)


def read_turn(turn) -> tuple[str | None, object, object]:
    """(role, content, speaker as written) of one chat turn, OpenAI (role/content) or ShareGPT (from/value); the
    role is None when the speaker is not one of ROLE_NAMES."""
    # datasets unifies the turn schema of a file, so an absent key reads as None
    turn = turn if isinstance(turn, dict) else {}
    speaker = turn.get("role") if turn.get("role") is not None else turn.get("from")
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    role = ROLE_NAMES.get(str(speaker).lower()) if speaker is not None else None
    return role, content, speaker


def chat_messages(row: dict, number: int, label: str) -> list[dict]:
    """``[{"role", "content"}]`` of one chat row; ShareGPT names mapped; UserError without an assistant turn."""
    turns = row.get("messages") if row.get("messages") is not None else row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{label}: row {number} has no list of messages; give each row a non-empty 'messages' list")
    messages = []
    for turn in turns:
        role, content, speaker = read_turn(turn)
        if role is None:
            raise UserError(f"{label}: row {number} has a message with role {speaker!r}; use user, assistant or "
                            "system (ShareGPT: human, gpt, system)")
        if not isinstance(content, str):
            raise UserError(f"{label}: row {number} has a {role} message without text content; fix or remove that row")
        messages.append({"role": role, "content": content})
    system = row.get("system")
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not any(message["role"] == "assistant" for message in messages):
        raise UserError(f"{label}: row {number} has no assistant turn, so nothing to learn from; add an assistant "
                        "(ShareGPT: gpt) reply or remove that row")
    return messages
