"""One way to run a DPO stage, for every caller (the pipeline's methods, the online baseline's rounds, `rbrm dpo`):
build the trainer, resume from the last checkpoint in its output folder, train, save the policy (and the probe
when it learns), and write the log."""

from __future__ import annotations

import os
import shutil

from datasets import load_from_disk
from transformers.trainer_utils import get_last_checkpoint

from ..distributed import barrier, is_main, sum_numbers, world_size
from ..files import write_json
from .config import ConfidenceDPOConfig
from .trainer import ConfidenceDPOTrainer


def last_checkpoint(directory: str) -> str | None:
    """The newest `checkpoint-N` in `directory`, None when there is none (or no folder yet)."""
    return get_last_checkpoint(directory) if os.path.isdir(directory) else None


def shared_on_disk(dataset, directory: str):
    """Under several processes, an in-memory dataset as files in `directory`, which every process opens. TRL
    caches the precomputed reference log-probs beside a dataset's files; an in-memory dataset's cache would sit in
    each process's own temporary folder, where the others cannot open it."""
    if world_size() == 1 or dataset is None or dataset.cache_files:
        return dataset
    if is_main():
        shutil.rmtree(directory, ignore_errors=True)
        dataset.save_to_disk(directory)
    barrier()
    return load_from_disk(directory)


def dpo_compute(trainer: ConfidenceDPOTrainer) -> tuple[int, int]:
    """(forward tokens, FLOPs) of a finished DPO run, every process's share summed: each trainer counts its own."""
    forward_tokens, flops = sum_numbers(trainer.forward_tokens, trainer.flops)
    return int(forward_tokens), int(flops)


def train_dpo(model, tokenizer, args: ConfidenceDPOConfig, train_dataset, *, ref_model=None, peft_config=None,
              reward_model=None, eval_dataset=None, resume: str | None = None, save_to: str | None = None,
              log_path: str | None = None) -> ConfidenceDPOTrainer:
    """Train `model` on `train_dataset` and save it to `save_to` (default `args.output_dir`); the training log goes
    to `log_path` (default `<save_to>/dpo_log.json`). Resumes from `resume`, else from the last checkpoint in
    `args.output_dir`. Returns the trainer (its compute counters, state and model)."""
    train_dataset = shared_on_disk(train_dataset, os.path.join(args.output_dir, "train_dataset"))
    eval_dataset = shared_on_disk(eval_dataset, os.path.join(args.output_dir, "eval_dataset"))
    trainer = ConfidenceDPOTrainer(model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                                   eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config,
                                   reward_model=reward_model)
    trainer.train(resume_from_checkpoint=resume or last_checkpoint(args.output_dir))
    save_to = save_to or args.output_dir
    trainer.save_model(save_to)
    if trainer.accelerator.is_main_process:
        write_json(log_path or os.path.join(save_to, "dpo_log.json"), trainer.state.log_history)
    return trainer
