"""Flag values from a YAML file and from CONVEYOR_* environment variables.

Precedence, highest first: command line > environment > config file > built-in defaults.
Values from the file and the environment are converted and checked by the flag's own argparse
``type`` and ``choices``, so a value means the same wherever it comes from. The merged values
become the sub-parser's defaults before the command line is parsed, which is what lets the
command line win without re-implementing argparse.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "CONVEYOR_"
CONFIG_ENV = "CONVEYOR_CONFIG"
# CONVEYOR_* variables that are not flags; they are read elsewhere and never warned about.
NON_FLAG_ENV = frozenset({CONFIG_ENV, "CONVEYOR_NATIVE_CPU", "CONVEYOR_DEMO_MODEL"})
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
# Flags that make no sense in a file or the environment.
_SKIPPED_DESTS = frozenset({"help", "config"})


class ConfigError(ValueError):
    """A bad key or value in the config file or the environment; names the source."""


@dataclass
class LayeredValues:
    """Converted values per argparse dest, and warnings for the user."""

    values: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def flag_name(action: argparse.Action) -> str:
    """The first long option without dashes: 'max-num-seqs' for --max-num-seqs."""
    longs = [o for o in action.option_strings if o.startswith("--")]
    return longs[0][2:] if longs else action.dest.replace("_", "-")


def env_name(action: argparse.Action) -> str:
    """CONVEYOR_MAX_NUM_SEQS for --max-num-seqs."""
    return ENV_PREFIX + flag_name(action).replace("-", "_").upper()


def layerable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Options that a file or env may set, keyed by flag name with underscores."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if not action.option_strings or action.dest in _SKIPPED_DESTS:
            continue
        if action.dest == argparse.SUPPRESS:  # --help, --version
            continue
        out[flag_name(action).replace("-", "_")] = action
    return out


def parse_bool(value: Any, source: str) -> bool:
    """true/false/1/0/yes/no in any case; YAML's own booleans and 0/1 integers too."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{source}: invalid boolean value: {value!r} "
                      "(use true/false, 1/0 or yes/no)")


def _is_append_action(action: argparse.Action) -> bool:
    # argparse has no public base class for append/extend.
    return isinstance(action, argparse._AppendAction)  # noqa: SLF001


def _is_list_action(action: argparse.Action) -> bool:
    return (_is_append_action(action) or action.nargs in ("*", "+")
            or (isinstance(action.nargs, int) and action.nargs > 0))


def _convert_one(action: argparse.Action, value: Any, source: str) -> Any:
    """One string through the flag's type and choices, as argparse would do it."""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{source}: expected a single value, got {value!r}")
    if isinstance(value, bool) and action.type is not None:
        # str(True) == "True" would slip through str-like types; a bool is never meant here.
        raise ConfigError(f"{source}: expected a value of type {_type_name(action)}, got {value!r}")
    text = str(value)
    converted: Any = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            detail = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else (
                f"invalid {_type_name(action)} value: {text!r}")
            raise ConfigError(f"{source}: {detail}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ConfigError(f"{source}: invalid choice: {converted!r} (choose from {choices})")
    return converted


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", repr(action.type))


def convert_value(action: argparse.Action, value: Any, source: str) -> Any:
    """The value argparse would store for `value` given to this flag."""
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction / store_const
        flag_on = parse_bool(value, source)
        if isinstance(action, argparse.BooleanOptionalAction):
            return flag_on
        # true = "the flag was given"; false = "it was not".
        return action.const if flag_on else action.default
    if _is_list_action(action):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, item, source) for item in items]
    return _convert_one(action, value, source)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML file's top-level mapping ({} for an empty file)."""
    import yaml  # lazy: only a run that names a config file needs it

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of flag names to values, "
                          f"got {type(data).__name__}")
    return data


def values_from_file(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """Converted values per dest; an unknown key is an error. A null value means "unset"."""
    actions = layerable_actions(parser)
    out: dict[str, Any] = {}
    for key, value in load_config_file(path).items():
        source = f"config file {path}: key '{key}'"
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise ConfigError(f"{source}: not a flag of '{parser.prog}'")
        if value is not None:
            out[action.dest] = convert_value(action, value, source)
    return out


def values_from_env(parser: argparse.ArgumentParser, environ: Mapping[str, str],
                    other_env_names: frozenset[str] = frozenset()) -> LayeredValues:
    """Converted values per dest from CONVEYOR_* variables; an empty value means "unset".

    Unknown CONVEYOR_* names only warn: the prefix is shared with variables that are not flags
    (other_env_names: flags of the other commands, which this one ignores silently).
    """
    by_env = {env_name(a): a for a in layerable_actions(parser).values()}
    out = LayeredValues()
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        action = by_env.get(name)
        if action is None:
            if name not in NON_FLAG_ENV and name not in other_env_names:
                out.warnings.append(f"environment variable {name} is not a flag of "
                                    f"'{parser.prog}'; ignored")
            continue
        if environ[name] != "":
            out.values[action.dest] = convert_value(action, environ[name],
                                                    f"environment variable {name}")
    return out


def env_names(parser: argparse.ArgumentParser) -> frozenset[str]:
    """Every CONVEYOR_* name that sets a flag of this parser."""
    return frozenset(env_name(a) for a in layerable_actions(parser).values())


def apply_as_defaults(parser: argparse.ArgumentParser, values: dict[str, Any]) -> list[str]:
    """Install the layered values as the parser's defaults; returns the list dests to fill later.

    An append flag cannot take its value as a default: argparse appends command-line values to
    the default list, and the command line must replace, not extend, it.
    """
    deferred: list[str] = []
    for action in layerable_actions(parser).values():
        if action.dest not in values:
            continue
        action.required = False  # e.g. generate's --prompt, given by the file or env
        if _is_append_action(action):
            deferred.append(action.dest)
        else:
            action.default = values[action.dest]
    return deferred
