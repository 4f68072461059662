"""One way to run a DPO stage, for every caller (the pipeline's methods, the online baseline's rounds, `rbrm dpo`):
build the trainer, resume from the last checkpoint in its output folder, train, save the policy (and the probe
when it learns), and write the log."""

from __future__ import annotations

import os

from transformers.trainer_utils import get_last_checkpoint

from ..files import write_json
from .config import ConfidenceDPOConfig
from .trainer import ConfidenceDPOTrainer


def last_checkpoint(directory: str) -> str | None:
    """The newest `checkpoint-N` in `directory`, None when there is none (or no folder yet)."""
    return get_last_checkpoint(directory) if os.path.isdir(directory) else None


def train_dpo(model, tokenizer, args: ConfidenceDPOConfig, train_dataset, *, ref_model=None, peft_config=None,
              reward_model=None, eval_dataset=None, resume: str | None = None, save_to: str | None = None,
              log_path: str | None = None) -> ConfidenceDPOTrainer:
    """Train `model` on `train_dataset` and save it to `save_to` (default `args.output_dir`); the training log goes
    to `log_path` (default `<save_to>/dpo_log.json`). Resumes from `resume`, else from the last checkpoint in
    `args.output_dir`. Returns the trainer (its compute counters, state and model)."""
    trainer = ConfidenceDPOTrainer(model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                                   eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config,
                                   reward_model=reward_model)
    trainer.train(resume_from_checkpoint=resume or last_checkpoint(args.output_dir))
    save_to = save_to or args.output_dir
    trainer.save_model(save_to)
    if trainer.accelerator.is_main_process:
        write_json(log_path or os.path.join(save_to, "dpo_log.json"), trainer.state.log_history)
    return trainer
