"""Train the hybrid reward model with the paper's command-line flags (runs `rbrm probe train`).

    python mos_train.py --data_path PAIRS.jsonl --model_path MODEL --write_path OUT_DIR \
        [--dim 576] [--layer 30] [--length N] [--test_idx K] [--model_name NAME]

`--dim` and `--layer` are checked against the model (its hidden size and layer count), never used to build
anything. `--length` reads at most N examples; `--test_idx` picks which validation split is held out
(it seeds the split); `--model_name` is recorded in the saved config.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import AutoConfig, HfArgumentParser

from rbrm.cli import main as rbrm_main
from rbrm.models import DEFAULT_MODEL, resolve_model


@dataclass
class MosTrainConfig:
    data_path: str = field(metadata={"help": "preference pairs or labelled responses"})
    write_path: str = field(metadata={"help": "output folder for the hybrid reward model"})
    model_path: str = field(default=DEFAULT_MODEL, metadata={"help": "the policy: alias, folder, .gguf or hub id"})
    dim: int | None = field(default=None, metadata={"help": "hidden size, checked against the model"})
    layer: int | None = field(default=None, metadata={"help": "layer count, checked against the model"})
    length: int | None = field(default=None, metadata={"help": "read at most N examples"})
    test_idx: int = field(default=0, metadata={"help": "which validation split is held out (seeds the split)"})
    model_name: str | None = field(default=None, metadata={"help": "recorded in the saved config"})


def main(argv: list[str] | None = None) -> int:
    """The paper's flags; any other `rbrm probe train` option passes through."""
    parser = HfArgumentParser(MosTrainConfig, description=__doc__.splitlines()[0])
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)

    if args.dim is not None or args.layer is not None:
        config = AutoConfig.from_pretrained(resolve_model(args.model_path))
        for flag, given, actual in (("--dim", args.dim, config.hidden_size),
                                    ("--layer", args.layer, config.num_hidden_layers)):
            if given is not None and given != actual:
                parser.error(f"{flag} {given} does not match the model ({actual}); drop the flag: "
                             "sizes are read from the model")

    command = ["probe", "train", "--data", args.data_path, "--model", args.model_path, "--out", args.write_path,
               "--seed", str(args.test_idx)]
    if args.length is not None:
        command += ["--limit", str(args.length)]
    if args.model_name:
        command += ["--model_name", args.model_name]
    return rbrm_main(command + rest)


if __name__ == "__main__":
    sys.exit(main())
