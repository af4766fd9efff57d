"""Prompt templates of the authors' protocol (NeuroAda / pyreft, LLM-Adapters data).

* ``commonsense``: prompt = instruction + "\\n"; target = output ("the correct answer is X").
* ``alpaca`` (math): the Alpaca instruction template; target = output.

The eos token is appended by the tokenisation step, not here, so the same prompt serves
training and evaluation. No dependencies beyond the error type: eval code imports this.
"""
from __future__ import annotations

from ..errors import UserError

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
TEMPLATES = ("commonsense", "alpaca")


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; use one of {', '.join(TEMPLATES)}")


def build_prompt(row: dict, template: str) -> str:
    """The text the model is conditioned on (no loss on it).

    LLM-Adapters rows always have ``input == ""``. A non-empty input (user data) is kept rather
    than dropped: ``alpaca`` uses the standard Alpaca "### Input:" variant, ``commonsense``
    puts it on its own line after the instruction.
    """
    _check_template(template)
    instruction = row["instruction"]
    extra = row.get("input") or ""
    if template == "commonsense":
        return f"{instruction}\n{extra}\n" if extra else f"{instruction}\n"
    if extra:
        return (
            f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
            f"### Input:\n{extra}\n\n### Response:\n"
        )
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def build_target(row: dict, template: str) -> str:
    """The supervised continuation (the tokeniser appends eos)."""
    _check_template(template)
    return row["output"]
