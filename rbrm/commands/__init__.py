"""The command layer: `rbrm <command>`'s functions, over the pipeline, evaluation and method modules.

Each command is a config dataclass and a function that takes it, as TRL's scripts are. `parse_config` is the
one option parser: transformers' `TrlParser` (an `HfArgumentParser`), with `--config FILE.yaml` supplying defaults that flags
override.
"""

from __future__ import annotations

import dataclasses

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
