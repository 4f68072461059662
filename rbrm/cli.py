"""`rbrm <command>`: a thin dispatcher over the stage modules.

Each command is a config dataclass and a function that takes it. Options parse with transformers'
`HfArgumentParser`; `--config FILE.yaml` supplies defaults that command-line flags override, as TRL does.
Imports are lazy so that `rbrm --help` is instant.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

from .errors import RbrmError

# command words -> ("module:ConfigClass", "module:function", one-line help). A config class of None means the
# function parses its own options: it is called with the argument list (e.g. `rbrm dpo`, which uses TRL's TrlParser).
COMMANDS: dict[tuple[str, ...], tuple[str | None, str, str]] = {
    ("model", "prepare"): ("rbrm.models:PrepareConfig", "rbrm.models:prepare",
                           "convert the model once to a local safetensors folder and print its path"),
    ("features",): ("rbrm.features:FeaturesConfig", "rbrm.features:run_features",
                    "hidden states at the response end for every layer, as safetensors"),
    ("probe", "train"): ("rbrm.reward_model:ProbeTrainConfig", "rbrm.reward_model:run_probe_train",
                         "train the hybrid reward model (per-layer probes + vote gate)"),
    ("probe", "plot"): ("rbrm.plots:ProbePlotConfig", "rbrm.plots:run_probe_plot",
                        "PCA of safe/unsafe representations per layer (PNG)"),
    ("sample",): ("rbrm.sampling:SampleConfig", "rbrm.sampling:run_sample",
                  "sample N responses per prompt from the policy (batched, resumable)"),
    ("rerank",): ("rbrm.rerank:RerankConfig", "rbrm.rerank:run_rerank",
                  "score samples with the hybrid reward; write ranking, chosen/rejected and DPO pairs"),
    ("dpo",): (None, "rbrm.trainer:run_dpo", "DPO with per-pair confidence from the hybrid reward (TRL options)"),
    ("eval",): (None, "rbrm.evaluation:main_eval",
                "greedy answers to prompt sets, judged: unsafe / refusal / over-refusal rates with 95% CIs"),
    ("eval", "plot"): ("rbrm.evaluation:EvalPlotConfig", "rbrm.evaluation:run_eval_plot",
                       "compare `rbrm eval` runs: unsafe rate and over-refusal per model (PNG)"),
    ("judge",): ("rbrm.evaluation:JudgeConfig", "rbrm.evaluation:run_judge",
                 "judge (prompt, response) rows: add unsafe, score and refusal"),
    ("pipeline",): (None, "rbrm.pipeline:main",
                    "stages 1-4 for each method in a YAML config (cached, resumable), then report.md/json"),
}


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def parse_config(config_cls, argv: list[str], prog: str):
    """Parse `argv` into `config_cls`; values in `--config FILE.yaml` are defaults that flags override."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_cls, prog=prog)
    parser.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit(f"{prog}: --config needs a file")
        config_path = argv[i + 1]
    if config_path:
        import yaml

        with open(config_path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise SystemExit(f"{config_path}: expected a mapping of option names to values")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"{config_path}: unknown option(s) {', '.join(unknown)} for `{prog}`")
        parser.set_defaults(**values)
        for action in parser._actions:  # a YAML value satisfies a required flag
            if action.dest in values:
                action.required = False
    (config,) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)[:1]
    return config


def _usage() -> str:
    lines = ["usage: rbrm <command> [options]   (rbrm <command> --help for its options)", "", "commands:"]
    for words, (_, _, text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<16} {text}")
    return "\n".join(lines)


def _run(words: tuple[str, ...], argv: list[str]) -> int:
    config_spec, func_spec, _ = COMMANDS[words]
    if config_spec is None:
        result = _load(func_spec)(argv)
    else:
        result = _load(func_spec)(parse_config(_load(config_spec), argv, prog="rbrm " + " ".join(words)))
    return int(result) if isinstance(result, int) else 0


def error_message(err: BaseException) -> str:
    """One line for the user. OS errors keep their file name; a decoding error says what to do."""
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({err}); re-save it as UTF-8"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Dispatch; a user error (bad file, setting or model) ends in one message and exit status 2, not a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            prog = "rbrm " + " ".join(words)
            try:
                return _run(words, argv[n:])
            except KeyboardInterrupt:
                print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
                return 130
            except (RbrmError, OSError, ValueError) as err:  # ValueError: also the libraries' bad-setting errors
                if os.environ.get("RBRM_DEBUG"):
                    raise
                print(f"{prog}: error: {error_message(err)}\n(set RBRM_DEBUG=1 for the traceback)", file=sys.stderr)
                return 2
    print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    raise SystemExit(main())
