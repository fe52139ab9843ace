"""Command-line flags that can also be set from ``DIFFUSIOND_*`` environment variables.

Containers and orchestrators configure a process through its environment, so
every ``serve`` flag has a variable: ``--max-batch-size`` is
``DIFFUSIOND_MAX_BATCH_SIZE``. The command line wins over the environment, which
wins over the default. A variable is checked as its flag is (type, choices) and
a bad value is an error naming the variable. Switches take 1/true/yes/on or
0/false/no/off; a repeatable flag (``--model``) takes its values separated by
commas.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

PREFIX = "DIFFUSIOND_"
# DIFFUSIOND_AUTH_TOKENS already holds the tokens themselves (server/auth.py), so the file has its own name.
RENAMED = {"--auth-tokens": "DIFFUSIOND_AUTH_TOKENS_FILE"}
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def variable_for(option: str) -> str:
    return RENAMED.get(option, PREFIX + option.lstrip("-").replace("-", "_").upper())


class EnvironmentDefaults:
    """Applies the variables to one parser's flags; ``finish`` completes the parsed arguments."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
        self.parser = parser
        self.environ = os.environ if environ is None else environ
        self._lists: dict[str, list] = {}  # repeatable flags, filled in only when the command line has none
        for action in parser._actions:
            option = next((o for o in action.option_strings if o.startswith("--")), None)
            if option is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            name = variable_for(option)
            if action.help is not argparse.SUPPRESS:
                action.help = f"{action.help or ''} [env {name}]".strip()
            if name in self.environ:
                self._apply(action, name, self.environ[name])

    def _apply(self, action: argparse.Action, name: str, text: str) -> None:
        if action.nargs == 0:  # a switch: store_true / store_false
            value = text.strip().lower()
            if value not in TRUE | FALSE:
                self._error(name, text, "expected 1, true, yes, on or 0, false, no, off")
            on = value in TRUE
            action.default = on if action.const is True else not on
        elif isinstance(action, argparse._AppendAction):
            self._lists[action.dest] = [self._convert(action, name, item.strip()) for item in text.split(",") if item.strip()]
        else:
            action.default = self._convert(action, name, text)

    def _convert(self, action: argparse.Action, name: str, text: str) -> object:
        try:
            value = action.type(text) if callable(action.type) else text
        except (TypeError, ValueError) as exc:
            self._error(name, text, str(exc) or f"not a valid {getattr(action.type, '__name__', 'value')}")
        if action.choices is not None and value not in action.choices:
            self._error(name, text, f"choose from {', '.join(map(repr, action.choices))}")
        return value

    def _error(self, name: str, text: str, why: str) -> None:
        self.parser.error(f"environment variable {name}={text[:100]!r}: {why}")

    def finish(self, args: argparse.Namespace) -> argparse.Namespace:
        for dest, values in self._lists.items():
            if getattr(args, dest, None) is None:
                setattr(args, dest, values)
        return args
