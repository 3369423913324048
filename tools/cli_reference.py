"""The command-line reference of ``python -m agents.ppo_kl`` as Markdown, generated from its argument
parser (``agents.cli.config.build_parser``), so the documented flags cannot drift from the real ones.

Used in docs/ppokl.md through ``<!-- generated: tools.cli_reference:ppo_kl_flags -->``
(see tools/docs_blocks.py).
"""

from __future__ import annotations

import argparse

from agents.cli.config import build_parser


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell: pipes escaped, whitespace on one line."""
    return " ".join(text.split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    return " / ".join(f"`{flag}`" for flag in action.option_strings)


def _value(action: argparse.Action) -> str:
    """What the flag takes: its choices, its type's name, or nothing for an on/off switch."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on/off"
    if action.choices is not None:
        return " \\| ".join(f"`{choice}`" for choice in action.choices)
    return getattr(action.type, "__name__", "value") if action.type else "value"


def flags_table(parser: argparse.ArgumentParser) -> str:
    """A Markdown table with one row per option of ``parser``: its flags, the value it takes and its
    help text (which states the default). ``--help`` itself is left out."""
    rows = ["| flag | value | what it does |", "|---|---|---|"]
    for action in parser._actions:  # argparse keeps the options in definition order only here
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        rows.append(f"| {_flags(action)} | {_value(action)} | {_cell(action.help or '')} |")
    return "\n".join(rows)


def ppo_kl_flags() -> str:
    """Every flag of ``python -m agents.ppo_kl``, with the parser's usage line above the table."""
    parser = build_parser()
    return f"`{parser.prog} [flags]`: {_cell(parser.description or '')}\n\n{flags_table(parser)}"
