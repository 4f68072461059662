"""The command layer: `rbrm <command>`'s functions, over the pipeline, evaluation and method modules.

Each command is a config dataclass and a function that takes it, as TRL's scripts are. `parse_config` is the
one option parser: transformers' `TrlParser` (an `HfArgumentParser`), with `--config FILE.yaml` supplying defaults that flags
override. `rbrm dpo` calls `TrlParser` itself (three dataclasses, as TRL's script), and `rbrm pipeline` calls
`HfArgumentParser`, since its `--config` is the run's YAML rather than a file of the command's options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import yaml
from trl import TrlParser

from ..errors import ConfigError


def parse_config(config_cls, argv: list[str], prog: str):
    """Parse `argv` into `config_cls` with TRL's parser: values in `--config FILE.yaml` are defaults that flags
    override. Unknown YAML keys and a `--config` without a file are errors that name them."""
    parser = TrlParser(config_cls, prog=prog)
    parser.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ConfigError("--config needs a file")
        with open(argv[i + 1]) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{argv[i + 1]}: expected a mapping of option names to values")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_cls)} - {"env"})
        if unknown:
            raise ConfigError(f"{argv[i + 1]}: unknown option(s) {', '.join(unknown)} for `{prog}`")
    return parser.parse_args_and_config(args=argv)[0]


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
