"""The command layer: `rbrm <command>`'s functions, over the pipeline, evaluation and method modules.

Every command has one shape, as TRL's scripts do: config dataclasses and a function that takes one instance of
each (`rbrm.cli.COMMANDS` lists them). `parse_config` is the one option parser: TRL's `TrlParser` (an
`HfArgumentParser`), where `--config FILE.yaml` supplies defaults that flags override. A command whose config
has its own `config` field (`rbrm pipeline`: the run's YAML) gets a plain `HfArgumentParser` instead.

Output flags: `--out` is what a command writes (a file or a folder); `rbrm dpo` keeps TRL's `--output_dir`;
`rbrm pipeline --out-dir` is the parent folder of its runs, as the run YAML's `out_dir`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence

import yaml
from transformers import HfArgumentParser
from trl import TrlParser

from ..errors import ConfigError


def is_list(annotation) -> bool:
    """`list[str]`, `list[str] | None` and the like."""
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list
                                                         for a in typing.get_args(annotation))


def list_flags(config_classes: Sequence[type]) -> list[str]:
    """The flags of list-valued fields, in both spellings HfArgumentParser accepts (`--out_dir`, `--out-dir`)."""
    flags = set()
    for cls in config_classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if is_list(hints.get(f.name)):
                flags |= {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
    return sorted(flags)


def parse_config(config_classes: type | Sequence[type], argv: list[str], prog: str, description: str | None = None):
    """Parse `argv` into one instance of each config class (a single class gives a single instance).

    A repeated list flag adds to the list (`--prompts A --prompts B` is `--prompts A B`). A class may define
    `cli_defaults()`, defaults that depend on the machine (`rbrm dpo`: CPU training). Unknown YAML keys and a
    `--config` without a file are errors that name them.
    """
    single = isinstance(config_classes, type)
    classes = (config_classes,) if single else tuple(config_classes)
    argv = merge_repeated(argv, list_flags(classes))
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    if "config" in names:  # the command's own --config (a run YAML), not a file of options
        parser = HfArgumentParser(classes, prog=prog, description=description)
        parsed = parser.parse_args_into_dataclasses(args=argv)
    else:
        parser = TrlParser(classes, prog=prog, description=description)
        parser.add_argument("--config", default=None, help="YAML file of options (flags override it)")
        for cls in classes:
            if hasattr(cls, "cli_defaults"):
                parser.set_defaults(**cls.cli_defaults())
        if "--config" in argv:
            check_options_file(argv, names, prog)
        parsed = parser.parse_args_and_config(args=argv)
    parsed = tuple(parsed)[:len(classes)]  # TrlParser adds a Namespace holding --config
    return parsed[0] if single else parsed


def check_options_file(argv: list[str], names: set[str], prog: str) -> None:
    i = argv.index("--config")
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise ConfigError("--config needs a file")
    with open(argv[i + 1]) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{argv[i + 1]}: expected a mapping of option names to values")
    unknown = sorted(set(values) - names - {"env"})
    if unknown:
        raise ConfigError(f"{argv[i + 1]}: unknown option(s) {', '.join(unknown)} for `{prog}`")


def merge_repeated(argv: list[str], flags: Sequence[str]) -> list[str]:
    """`--prompts A --prompts B` -> `--prompts A B` (argparse would keep only the last list)."""
    out: list[str] = []
    collected: dict[str, list[str]] = {}
    position: dict[str, int] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        if name in flags:
            if name not in position:
                position[name] = len(out)
                out.append(name)
            values = collected.setdefault(name, [])
            if eq:
                values.append(inline)
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            continue
        out.append(token)
        i += 1
    for name in sorted(position, key=position.get, reverse=True):
        out[position[name] + 1:position[name] + 1] = collected[name]
    return out
