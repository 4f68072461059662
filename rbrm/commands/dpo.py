"""`rbrm dpo`: DPO with per-pair confidence from the hybrid reward, with TRL's options (TRL's `scripts/dpo.py`).

Options parse with `TrlParser` (`rbrm.commands.parse_config`) from `DPOCommandConfig`, `ConfidenceDPOConfig` and
TRL's `ModelConfig` (LoRA), so `--config file.yaml` works as in TRL. For launching on GPUs see `rbrm.dpo.trainer`'s docstring.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import ModelConfig, get_peft_config

from ..dpo import REWARD_DIR, ConfidenceDPOConfig, machine_defaults, pairs_dataset, train_dpo
from ..models import (
    DEFAULT_MODEL,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)

log = logging.getLogger(__name__)


@dataclass
class DPOCommandConfig:
    """`rbrm dpo` options besides DPOConfig / ConfidenceDPOConfig and TRL's ModelConfig (LoRA) ones (TRL's
    `ScriptArguments`)."""

    pairs: str = field(metadata={"help": "TRL preference jsonl (prompt, chosen, rejected[, confidence]) or any "
                                         "pair format rbrm.formats reads"})
    model: str | None = field(default=None, metadata={
        "help": "policy: alias, folder, .gguf or hub id (default: --model_name_or_path, else smollm2-135m-instruct)"})
    reward: str | None = field(default=None, metadata={"help": "hybrid reward model folder (rbrm probe train)"})
    ref_model: str | None = field(default=None, metadata={
        "help": "reference model (default: a frozen copy of the initial policy; with LoRA: the base model)"})
    eval_pairs: str | None = field(default=None, metadata={"help": "held-out pairs for evaluation"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N pairs"})
    format: str = field(default="auto", metadata={"help": "pair file format (default: detect)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start afresh, deleting the checkpoints in --output_dir (by default a rerun of the same command "
                "resumes from the last one)"})

    @staticmethod
    def cli_defaults() -> dict:
        """Defaults only (a --config YAML and flags still override): the machine's, as the pipeline's
        (`rbrm.dpo.machine_defaults`)."""
        return machine_defaults()


def checkpoint_to_resume(output_dir: str, requested: str | None, overwrite: bool) -> str | None:
    """The checkpoint a run continues from: the one asked for, else the last in `output_dir` unless `overwrite`
    (which deletes them), so that rerunning a killed `rbrm dpo` resumes as `rbrm sample` and `rbrm eval` do."""
    if requested:
        return requested
    if not os.path.isdir(output_dir):
        return None
    if overwrite:
        for name in os.listdir(output_dir):
            if name.startswith(PREFIX_CHECKPOINT_DIR + "-"):
                shutil.rmtree(os.path.join(output_dir, name))
        return None
    last = get_last_checkpoint(output_dir)
    if last is not None:
        log.warning("resuming from %s (pass --overwrite_output_dir to start afresh)", last)
    return last


def run_dpo(script: DPOCommandConfig, config: ConfidenceDPOConfig, model_args: ModelConfig) -> int:
    """`rbrm dpo`: load, train, save policy + probe."""
    name = script.model or model_args.model_name_or_path or DEFAULT_MODEL
    path = resolve_model(name)
    dtype = resolve_dtype(model_args.dtype, "cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu")
    load_kwargs = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if model_args.attn_implementation:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    model = load_causal_lm(path, **load_kwargs)
    ref_model = None
    if script.ref_model:
        ref_model = load_causal_lm(resolve_model(script.ref_model), **load_kwargs)
    tokenizer = load_tokenizer(path)
    train = pairs_dataset(script.pairs, tokenizer, script.limit, script.format)
    evaluation = pairs_dataset(script.eval_pairs, tokenizer, None, script.format) if script.eval_pairs else None
    resume = checkpoint_to_resume(config.output_dir, config.resume_from_checkpoint, script.overwrite_output_dir)
    trainer = train_dpo(model, tokenizer, config, train, ref_model=ref_model, peft_config=get_peft_config(model_args),
                        reward_model=script.reward, eval_dataset=evaluation, resume=resume)
    if trainer.accelerator.is_main_process:
        counts = trainer.pair_counts.get("train", {})
        print(f"saved the policy to {config.output_dir}"
              + (f" and the probe to {os.path.join(config.output_dir, REWARD_DIR)}" if script.reward else "")
              + f"; {len(trainer.train_dataset)} training pairs"
              + (" (" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()) + ")" if counts else ""))
    return 0
