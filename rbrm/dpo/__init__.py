"""DPO with per-pair preference confidence from the hybrid reward (docs/method.md §4), laid out as TRL lays out
its trainers: `config.py` (the config dataclass), `data.py` (pairs rendered, tokenised and collated with the token
contract of `rbrm.render`), `lm_head.py` (completion log-probs on CPUs), `trainer.py` (the `DPOTrainer` subclass),
`train.py` (one DPO run: build, resume, train, save), and `safedpo.py` (the SafeDPO baseline's data:
safety-labelled pairs into rows whose `safety_margin` the trainer reads with `ConfidenceDPOConfig.safety_margin`).
The command, `rbrm dpo`, is `rbrm.commands.dpo`, as TRL's is `trl/scripts/dpo.py`.
"""

from .config import CONFIDENCE_MODES, ConfidenceDPOConfig, machine_defaults, trains_on_cpu
from .data import pairs_dataset, preference_dataset, render_and_tokenize
from .safedpo import SAFETY_MARGIN_COLUMN, load_safedpo_rows, safedpo_dataset, safedpo_rows, safedpo_transform
from .train import dpo_compute, last_checkpoint, train_dpo
from .trainer import REWARD_DIR, ConfidenceDPOTrainer

__all__ = ["CONFIDENCE_MODES", "REWARD_DIR", "SAFETY_MARGIN_COLUMN", "ConfidenceDPOConfig", "ConfidenceDPOTrainer",
           "dpo_compute", "last_checkpoint", "load_safedpo_rows", "machine_defaults", "pairs_dataset", "preference_dataset",
           "render_and_tokenize", "safedpo_dataset", "safedpo_rows", "safedpo_transform", "train_dpo",
           "trains_on_cpu"]
