"""Run the bundle's configs from the ``medvar`` command line: flags are config ids, defaults live in the YAML.

A subcommand declares its flags as :class:`ConfigOption` rows (flag → config id);
:func:`add_config_options` adds them to its parser with the default read from the config file,
and :func:`~medvar_bundle.bundle_config.run_config` runs the config through MONAI's
:class:`~monai.bundle.ConfigWorkflow` with the flags the user gave as overrides — exactly what
``python -m monai.bundle run --config_file configs/NAME.yaml --id value`` does.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from monai.bundle import ConfigParser

from .bundle_config import config_path, device_expression, run_config

__all__ = ["ConfigOption", "add_config_options", "config_path", "device_expression", "overrides_from", "run_config"]


@dataclass(frozen=True)
class ConfigOption:
    """A command-line flag that sets one config id.

    ``const`` makes a switch: giving the flag sets the id to ``const`` (``--fp32`` sets ``bf16``
    to false). ``to_config`` turns the parsed value into the config value (``--device cuda`` →
    ``$torch.device('cuda')``).
    """

    flag: str
    id: str
    help: str
    type: Callable | None = None
    const: object = None
    nargs: str | None = None
    choices: Sequence[str] | None = None
    required: bool = False
    to_config: Callable | None = None


def positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (batch sizes, step and slice counts)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _shown(value) -> str:
    """A config default as a user reads it: ``$torch.device('cpu')`` → ``cpu``, the bf16 rule in words."""
    text = str(value)
    if text == "$medvar_bundle.runtime.fast_bf16(@device)":
        return "on where the device has native bf16"
    if text.startswith("$torch.device('") and text.endswith("')"):
        return text[len("$torch.device('") : -2]
    return text


def add_config_options(parser: argparse.ArgumentParser, config: str, options: Sequence[ConfigOption]) -> None:
    """Add ``options`` to ``parser``; each help text ends with the id and its default from ``config``.
    Switches that set the same id (``--fp32`` and ``--bf16``) exclude each other."""
    try:
        defaults = ConfigParser(ConfigParser.load_config_file(config_path(config)))
    except FileNotFoundError:  # a package installed away from its bundle: --help still works, running says why
        defaults = None
    switches = Counter(o.id for o in options if o.const is not None)
    groups = {id: parser.add_mutually_exclusive_group() for id, n in switches.items() if n > 1}
    for o in options:
        if o.required or defaults is None:
            shown = "required" if o.required else f"default from configs/{config}.yaml"
        else:
            shown = f"default {_shown(defaults[o.id])}"
        # a switch says what it sets: "--quiet [progress; default True]" read as if quiet were the default
        text = f"{o.help} [{o.id}{'' if o.const is None else f' = {o.const}'}; {shown}]"
        if o.const is not None:
            groups.get(o.id, parser).add_argument(o.flag, dest=o.id, action="store_const", const=o.const, help=text)
        else:
            parser.add_argument(
                o.flag, dest=o.id, type=o.type, nargs=o.nargs, choices=o.choices, required=o.required, help=text
            )
    parser.set_defaults(config=config, config_options=options)


def overrides_from(args: argparse.Namespace) -> dict:
    """The config ids the user set on the command line, with their config values."""
    found = {}
    for o in args.config_options:
        value = getattr(args, o.id)
        if value is not None:
            found[o.id] = o.to_config(value) if o.to_config is not None else value
    return found


def output_path(args: argparse.Namespace, *parts: str) -> str:
    """A path inside the run folder the user gave (for the final message)."""
    return os.path.join(getattr(args, "output_dir"), *parts)
