"""The paper's DPO entry point, mapped onto `rbrm dpo` (rbrm/commands/dpo.py); thin on purpose.

    python dpo.py --data_path pairs.jsonl --model_path M --hybrid_reward_path RM_DIR --output_dir D \\
        [--model_ref_path REF] [any DPOConfig / ConfidenceDPOConfig / ModelConfig option, e.g. --use_peft]

On GPUs launch it like any TRL script, e.g. `accelerate launch --config_file <trl>/accelerate_configs/zero2.yaml
dpo.py ...` or `torchrun --nproc_per_node 8 dpo.py ...` (see the rbrm.dpo.trainer module docstring).
"""

from __future__ import annotations

import sys

from rbrm.cli import main as rbrm_main

# the paper's flag -> the `rbrm dpo` flag
FLAGS = {"--data_path": "--pairs", "--model_path": "--model", "--model_ref_path": "--ref_model",
         "--output_dir": "--output_dir", "--hybrid_reward_path": "--reward"}


def translate(argv: list[str]) -> list[str]:
    """Rename the paper's flags (also in `--flag=value` form); everything else passes through unchanged."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(FLAGS.get(name, name) + eq + value if name in FLAGS else arg)
    return out


def main(argv: list[str] | None = None) -> int:
    return rbrm_main(["dpo", *translate(list(sys.argv[1:] if argv is None else argv))])


if __name__ == "__main__":
    raise SystemExit(main())
