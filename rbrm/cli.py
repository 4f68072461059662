"""`rbrm <command>`: a thin dispatcher over the stage modules.

Each command is config dataclasses and a function that takes one instance of each, as TRL's scripts are.
Options parse with TRL's `TrlParser` (`rbrm.commands.parse_config`); `--config FILE.yaml` supplies defaults that
command-line flags override.
Imports are lazy so that `rbrm --help` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys

from .errors import RbrmError
from .memory import keep_freed_memory

# command words -> (its config classes, "module:Class" joined by spaces; the function "module:name", called with one
# instance of each class; one-line help).
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("model", "prepare"): ("rbrm.commands.model:PrepareConfig", "rbrm.commands.model:prepare",
                           "convert the model once to a local safetensors folder and print its path"),
    ("features",): ("rbrm.commands.features:FeaturesConfig", "rbrm.commands.features:run_features",
                    "hidden states at the response end for every layer, as safetensors"),
    ("probe", "train"): ("rbrm.probe_train:ProbeTrainConfig", "rbrm.probe_train:run_probe_train",
                         "train the hybrid reward model (per-layer probes + vote gate)"),
    ("probe", "plot"): ("rbrm.commands.model:ProbePlotConfig", "rbrm.commands.model:run_probe_plot",
                        "PCA of safe/unsafe representations per layer (PNG)"),
    ("sample",): ("rbrm.commands.sample:SampleConfig", "rbrm.commands.sample:run_sample",
                  "sample N responses per prompt from the policy (batched, resumable)"),
    ("rerank",): ("rbrm.commands.rerank:RerankConfig", "rbrm.commands.rerank:run_rerank",
                  "score samples with the hybrid reward; write ranking, chosen/rejected and DPO pairs"),
    ("dpo",): ("rbrm.commands.dpo:DPOCommandConfig rbrm.dpo:ConfidenceDPOConfig trl:ModelConfig",
               "rbrm.commands.dpo:run_dpo", "DPO with per-pair confidence from the hybrid reward (TRL options)"),
    ("eval",): ("rbrm.commands.evaluate:EvalConfig", "rbrm.commands.evaluate:run_eval",
                "greedy answers to prompt sets, judged: unsafe / refusal / over-refusal rates with 95% CIs"),
    ("eval", "plot"): ("rbrm.commands.evaluate:EvalPlotConfig", "rbrm.commands.evaluate:run_eval_plot",
                       "compare `rbrm eval` runs: unsafe rate and over-refusal per model (PNG)"),
    ("judge",): ("rbrm.commands.evaluate:JudgeConfig", "rbrm.commands.evaluate:run_judge",
                 "judge (prompt, response) rows: add unsafe, score and refusal"),
    ("audit",): ("rbrm.commands.audit:AuditConfig", "rbrm.commands.audit:run_audit",
                 "label a blind sample of a run's answers in the terminal (resumable), or --import labels"),
    ("pipeline",): ("rbrm.commands.pipeline:PipelineCommandConfig", "rbrm.commands.pipeline:run_pipeline",
                    "stages 1-4 for each method in a YAML config (cached, resumable), then report.md/json"),
}


def load_spec(spec: str):
    """"module:name" -> the object."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    lines = ["usage: rbrm <command> [options]   (rbrm <command> --help for its options)", "", "commands:"]
    for words, (_, _, text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<16} {text}")
    return "\n".join(lines)


def run_command(words: tuple[str, ...], argv: list[str]) -> int:
    """Parse `argv` into the command's config classes and call its function with them."""
    from .commands import parse_config  # here, not at the top: `rbrm --help` need not import transformers

    config_specs, func_spec, text = COMMANDS[words]
    classes = [load_spec(spec) for spec in config_specs.split()]
    configs = parse_config(classes, argv, prog="rbrm " + " ".join(words), description=text)
    result = load_spec(func_spec)(*configs)
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
            keep_freed_memory()  # page faults otherwise take ~8% of a long run's CPU (rbrm.memory)
            try:
                return run_command(words, argv[n:])
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
