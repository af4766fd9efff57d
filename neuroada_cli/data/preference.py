"""Preference pairs (task.kind=preference): reading, checking and tokenising prompt / chosen / rejected rows.

Where pairs come from:

* ``data.train_file`` (JSON, JSONL, CSV, Parquet or a hub id; data/files.py), with TRL's two layouts:
  standard, ``prompt`` / ``chosen`` / ``rejected`` strings; conversational, ``prompt`` a list of messages
  (``role``/``content``: system, user, earlier turns) and ``chosen`` / ``rejected`` lists of assistant messages,
  rendered with the model's chat template. A conversational file may leave ``prompt`` out: it is then the
  messages ``chosen`` and ``rejected`` share at their start (TRL's implicit prompt).
* else the LLM-Adapters set ``task.train_dataset`` (commonsense_15k): the prompt is ``task.template``'s, the
  chosen completion the row's own output ("the correct answer is answer2"), the rejected one the same sentence
  with a wrong option from the question's "Answer format: a/b/c" line, drawn with the seed.

Every row is checked when read, and a bad one is a one-line UserError naming the source and the row (numbered
from 1): a missing column, an empty prompt or completion, chosen equal to rejected, mixed string / message
layouts. ``tokenize_pairs`` adds the length check: prompt + chosen (or rejected) longer than
``data.max_length`` is refused (not truncated: a cut completion would compare two different things).

Tokens (``tokenize_pairs``), the convention of TRL's DPOTrainer and of data/tokenize.py:

* strings: ``prefix + ids(prompt + completion) + eos`` (prefix: the bos the tokenizer adds by itself);
* messages: ``ids(template(prompt + completion))`` without its trailing whitespace (the template writes bos
  and the end-of-turn token; the newline after it is formatting, as data/chat.py treats it);
* the completion starts where the ids of the prompt alone and of prompt + completion part (the common prefix;
  the smaller over chosen and rejected), so a token merged across the boundary belongs to the completion and
  chosen and rejected share the same prompt tokens.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from ..errors import UserError
from .formats import read_turn
from .prompts import build_prompt
from .tokenize import common_prefix

COLUMNS = ("prompt", "chosen", "rejected")
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)")


# ------------------------------------------------------------------------------------------ reading
def file_pairs(source: str, key: str) -> list[dict]:
    """Checked pairs of a user file or hub dataset named by config key ``key`` (``data.train_file``)."""
    from .files import read_table

    label, rows = read_table(source, key)
    return check_rows(rows, f"{key}={label}")


def check_rows(rows: list[dict], label: str) -> list[dict]:
    """Rows -> pairs ``{"prompt", "chosen", "rejected", "row"}`` (strings, or lists of messages); UserError on the
    first bad row."""
    columns = set(rows[0]) if rows else set()
    missing = [column for column in COLUMNS if column not in columns]
    implicit = missing == ["prompt"] and rows and all(isinstance(rows[0].get(c), list) for c in COLUMNS[1:])
    if missing and not implicit:
        raise UserError(f"{label}: preference data needs columns prompt, chosen, rejected; {', '.join(missing)} "
                        f"missing (it has {', '.join(sorted(map(str, columns))) or 'none'})")
    return [_pair(row, number, label, implicit) for number, row in enumerate(rows, 1)]


def _pair(row: dict, number: int, label: str, implicit: bool) -> dict:
    where = f"{label}: row {number}"
    if implicit:
        chosen, rejected = _messages(row.get("chosen"), where, "chosen"), _messages(row.get("rejected"), where, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise UserError(f"{where}: chosen and rejected share no first messages, so there is no prompt; add a "
                            "'prompt' column or fix that row")
    else:
        prompt, chosen, rejected = (row.get(column) for column in COLUMNS)
        kinds = {column: _layout(value) for column, value in zip(COLUMNS, (prompt, chosen, rejected))}
        bad = [column for column, kind in kinds.items() if kind is None]
        if bad:
            got = type(row.get(bad[0])).__name__
            raise UserError(f"{where}: column {bad[0]!r} is {got}, not text or a list of messages; fix or remove "
                            "that row")
        if len(set(kinds.values())) > 1:
            raise UserError(f"{where}: mixes text and message lists ({', '.join(f'{c}: {k}' for c, k in kinds.items())});"
                            " give all three as text or all three as messages")
        if kinds["prompt"] == "messages":
            prompt = _messages(prompt, where, "prompt")
            chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
    if _empty(prompt):
        raise UserError(f"{where}: the prompt is empty; every pair needs a prompt (fix or remove that row)")
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        if _empty(value):
            raise UserError(f"{where}: the {column} completion is empty; fix or remove that row")
        if isinstance(value, list) and any(message["role"] != "assistant" for message in value):
            raise UserError(f"{where}: the {column} messages must be assistant replies (the prompt holds the other "
                            "turns); fix that row")
    if chosen == rejected:
        raise UserError(f"{where}: chosen equals rejected, so the pair prefers nothing; fix or remove that row")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "row": number, "source": label}


def _layout(value) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "messages"
    return None


def _messages(value, where: str, column: str) -> list[dict]:
    """``[{"role", "content"}]`` with ShareGPT speaker names mapped (data/formats.read_turn)."""
    if not isinstance(value, list):
        raise UserError(f"{where}: column {column!r} is not a list of messages; fix or remove that row")
    messages = []
    for turn in value:
        role, content, _ = read_turn(turn)
        if role is None or not isinstance(content, str):
            raise UserError(f"{where}: {column} has a message without a known role (user, assistant, system) and "
                            "text content; fix or remove that row")
        messages.append({"role": role, "content": content})
    return messages


def _empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not message["content"].strip() for message in value)


# ----------------------------------------------------------------------- pairs from an LLM-Adapters set
def answer_options(instruction: str) -> list[str]:
    """The options of an LLM-Adapters question ("Answer format: answer1/answer2/answer3"), [] when none."""
    found = _ANSWER_FORMAT.search(instruction)
    return [part.strip() for part in found.group(1).split("/") if part.strip()] if found else []


def llm_adapters_pairs(rows: list[dict], template: str, seed: int, label: str) -> list[dict]:
    """One pair per multiple-choice row: chosen = its output, rejected = that sentence with a seeded wrong option.

    Rows without options to reject (no "Answer format" line, or an answer not among the options) are skipped;
    none left is a UserError (a generation set such as math_10k has nothing to reject).
    """
    rng = random.Random(f"neuroada-pairs:{seed}")
    pairs = []
    for number, row in enumerate(rows, 1):
        answer, output = str(row.get("answer") or "").strip(), row["output"]
        wrong = [option for option in answer_options(row["instruction"]) if option != answer]
        at = output.rfind(answer) if answer else -1
        if not wrong or at < 0:
            continue
        rejected = output[:at] + rng.choice(wrong) + output[at + len(answer):]
        pairs.append({"prompt": build_prompt(row, template), "chosen": output, "rejected": rejected, "row": number,
                      "source": label})
    if not pairs:
        raise UserError(f"{label} has no multiple-choice rows (an 'Answer format: a/b' line and an answer among "
                        "those options) to build rejected answers from; give your own pairs with data.train_file")
    return pairs


def load_pairs(*, train_dataset: str, data_dir: str | Path | None, template: str, train_file: str | None,
               limit: int | None, seed: int, val_file: str | None = None,
               val_fraction: float | None = None) -> tuple[list[dict], list[dict] | None]:
    """(training pairs, validation pairs or None), subset and held out exactly as causal-LM records are
    (data/train_sets.load_records: ``limit`` seeded rows, ``val_fraction`` of them or of the rest, or ``val_file``)."""
    from .. import paths
    from .train_sets import (
        _all_rows,
        _checked_stem,
        _limited_with_validation,
        seeded_subset,
        split_validation,
    )

    if val_file is not None and val_fraction is not None:
        raise UserError("data.val_file and data.val_fraction are both set; keep one (set the other to null)")
    if train_file is not None:
        pairs = file_pairs(train_file, "data.train_file")
    else:
        stem = _checked_stem(train_dataset)
        pairs = llm_adapters_pairs(_all_rows(stem, paths.data_dir(data_dir)), template, seed,
                                   f"task.train_dataset={stem}")
    if val_fraction is not None and limit is not None and limit < len(pairs):
        return _limited_with_validation(pairs, limit, val_fraction, seed)
    validation = None
    if val_fraction is not None:
        pairs, validation = split_validation(pairs, val_fraction, seed)
    elif val_file is not None:
        validation = file_pairs(val_file, "data.val_file")
    return seeded_subset(pairs, limit, seed), validation


# ------------------------------------------------------------------------------------------ tokens
def _texts(pair: dict, tokenizer) -> tuple[str, str, str, list[int]]:
    """(prompt text, prompt + chosen, prompt + rejected, ids to put in front) of one pair."""
    from .tokenize import special_prefix_ids

    if isinstance(pair["prompt"], str):
        return (pair["prompt"], pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"],
                special_prefix_ids(tokenizer))
    from .chat import _render, check_chat_tokenizer

    check_chat_tokenizer(tokenizer)
    prompt = _render(tokenizer, pair["prompt"], True)
    chosen = _render(tokenizer, pair["prompt"] + pair["chosen"], False).rstrip()
    rejected = _render(tokenizer, pair["prompt"] + pair["rejected"], False).rstrip()
    return prompt, chosen, rejected, []


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Pairs -> examples ``{"prompt_ids", "chosen_ids", "rejected_ids", "input_ids"}`` (see the module docstring).

    ``input_ids`` is the chosen sequence followed by the rejected one: the tokens one policy pass reads, which is
    how the recipe measures an example (length buckets, tokens/s). A pair whose prompt + completion exceeds
    ``max_length`` is a UserError naming its row.
    """
    from .tokenize import _eos_id, check_max_length

    check_max_length(max_length)
    examples, too_long = [], []
    for pair in pairs:
        prompt, chosen, rejected, prefix = _texts(pair, tokenizer)
        prompt_ids, chosen_full, rejected_full = (
            tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prompt, chosen, rejected))
        end = [_eos_id(tokenizer)] if isinstance(pair["prompt"], str) else []
        shared = min(common_prefix(prompt_ids, chosen_full), common_prefix(prompt_ids, rejected_full))
        head = prefix + list(chosen_full[:shared])
        chosen_ids, rejected_ids = list(chosen_full[shared:]) + end, list(rejected_full[shared:]) + end
        if not head:
            raise UserError(f"{pair['source']}: row {pair['row']}: the prompt gives no token before the completion "
                            "(nothing to condition on); fix or remove that row")
        if chosen_ids == rejected_ids:
            raise UserError(f"{pair['source']}: row {pair['row']}: chosen and rejected give the same tokens; fix or "
                            "remove that row")
        longest = len(head) + max(len(chosen_ids), len(rejected_ids))
        if longest > max_length:
            too_long.append((pair, longest))
        examples.append({"prompt_ids": head, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
                         "input_ids": head + chosen_ids + head + rejected_ids})
    if too_long:
        pair, length = too_long[0]
        raise UserError(f"{pair['source']}: row {pair['row']}: prompt + completion is {length} tokens, more than "
                        f"data.max_length={max_length} ({len(too_long)} of {len(pairs)} pairs are); raise "
                        "data.max_length or shorten or remove those rows")
    return examples
