"""`ConfidenceDPOConfig`: TRL's `DPOConfig` plus the confidence and online-probe settings (docs/method.md §4) and
SafeDPO's safety margin (`rbrm.dpo.safedpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig

from ..errors import ConfigError
from ..precision import cpu_prefers_bf16
from ..rerank import PAPER_ALPHA

CONFIDENCE_MODES = ("online", "static", "none")


@dataclass
class ConfidenceDPOConfig(DPOConfig):
    """`DPOConfig` plus the preference-confidence and online-probe settings of docs/method.md §4."""

    confidence: str = field(default="online", metadata={
        "help": "online: gamma from the hybrid reward on the policy's hidden states in the same forward; static: "
                "the pairs' `confidence` column (from `rbrm rerank`); none: plain DPO (TRL's sigmoid loss)",
        "choices": list(CONFIDENCE_MODES)})
    confidence_scale: str = field(default="calibrated", metadata={
        "help": "calibrated: gamma = sigmoid(a (r_c - r_r)) with the probe's calibrated scale a (fitted by `rbrm "
                "probe train` on rewards it did not train on), a probability that varies across pairs; alpha: the "
                "paper's fixed confidence_alpha", "choices": ["calibrated", "alpha"]})
    confidence_alpha: float = field(default=PAPER_ALPHA, metadata={
        "help": "gamma = sigmoid(alpha (r_c - r_r)) when confidence_scale=alpha (the paper: 7.5)"})
    confidence_floor: float = field(default=0.5, metadata={"help": "gamma is never below this (1.0: plain DPO)"})
    confidence_benign: float | None = field(default=None, metadata={
        "help": "gamma of the pairs ranked by the helpfulness reward (benign prompts): None takes their `confidence` "
                "column (the helpfulness probe's calibrated confidence); 1.0 trains them as plain DPO, so that the "
                "label confidence, which caps how far each pair moves the policy, applies to safety pairs only"})
    sft_benign: float = field(default=0.0, metadata={
        "help": "weight of a negative log-likelihood term (per token, averaged over the batch's pairs) on the chosen "
                "answers of the pairs ranked by the helpfulness reward: RPO's anchor, on benign prompts only. At 1.0 "
                "on validation prompts it held the whole policy near the base model, harmful prompts included "
                "(docs/results/README.md). 0: off"})
    confidence_batch_mean: bool = field(default=False, metadata={
        "help": "the paper code's variant: one gamma per micro-batch, the mean of the per-pair values, floored"})
    reward_lr: float = field(default=0.01, metadata={"help": "learning rate of the online probe update"})
    reward_optimizer: str = field(default="sgd", metadata={
        "help": "sgd or adam (the paper's). Adam's steps have the same size however small the gradient, so on pairs "
                "the probe already separates it keeps inflating the reward scale (and gamma saturates); SGD's "
                "steps shrink with the loss", "choices": ["sgd", "adam"]})
    reward_margin: float = field(default=1.0, metadata={"help": "margin m of the probe's pairwise loss"})
    reward_update: bool = field(default=True, metadata={
        "help": "keep training the hybrid reward during DPO (one probe step per optimiser step)"})
    reward_layer_loss_weight: float = field(default=0.0, metadata={
        "help": "also train each layer's probe on its own score with this weight, as `rbrm probe train` does "
                "(the paper updates the hybrid reward only: 0)"})
    safety_margin: float = field(default=0.0, metadata={
        "help": "SafeDPO's Delta (rbrm.dpo.safedpo; the paper's default: 10): each pair's loss is "
                "-log sigmoid(beta D - m Delta), m its `safety_margin` column (1 on a safe-over-unsafe pair, 0 on "
                "a safe-over-safe one). 0: the column is ignored (plain DPO). Needs confidence='none'"})
    compact_lm_head: bool = field(default=True, metadata={
        "help": "on devices without Triton (CPUs), score only the completion tokens with one log-softmax instead of "
                "TRL's tiled kernel over every position, prompt and padding included (rbrm.dpo.lm_head)"})

    def __post_init__(self):
        super().__post_init__()
        if self.confidence not in CONFIDENCE_MODES:
            raise ValueError(f"confidence={self.confidence!r}: choose one of {CONFIDENCE_MODES}")
        if not 0.0 <= self.confidence_floor <= 1.0:
            raise ValueError(f"confidence_floor={self.confidence_floor} must lie in [0, 1]")
        if self.confidence_benign is not None and not 0.0 < self.confidence_benign <= 1.0:
            raise ValueError(f"confidence_benign={self.confidence_benign} must lie in (0, 1], or be unset")
        if self.sft_benign < 0:
            raise ValueError(f"sft_benign={self.sft_benign} must be >= 0")
        if self.reward_optimizer not in ("adam", "sgd"):
            raise ValueError(f"reward_optimizer={self.reward_optimizer!r}: choose adam or sgd")
        if self.confidence_scale not in ("calibrated", "alpha"):
            raise ValueError(f"confidence_scale={self.confidence_scale!r}: choose calibrated or alpha")
        if self.confidence_alpha <= 0:
            raise ValueError(f"confidence_alpha={self.confidence_alpha} must be positive")
        if not 0.0 <= self.safety_margin < float("inf"):
            raise ConfigError(f"safety_margin={self.safety_margin} must be a number >= 0 (SafeDPO's Delta)")
        if self.safety_margin and self.confidence != "none":
            raise ConfigError(f"safety_margin={self.safety_margin} (SafeDPO) is plain DPO plus a margin: set "
                              f"confidence='none', not {self.confidence!r}")


def trains_on_cpu(device: str | None = None) -> bool:
    """DPO runs on the CPU: no CUDA, or the CPU asked for."""
    return not torch.cuda.is_available() or device == "cpu"


def machine_defaults(device: str | None = None) -> dict:
    """The DPO defaults that depend on the machine, for `rbrm dpo` and the pipeline alike. On a CPU: `use_cpu`, and
    bf16 autocast where bf16 is this CPU's faster precision (measured once per machine, `precision.cpu_precision`;
    a step 1.4x faster there, benchmarks/bench_dpo_step.py), fp32 where it is not (bf16 without AMX on an Intel
    Xeon) or would be emulated. On CUDA, TRL's own."""
    return {"use_cpu": True, "bf16": cpu_prefers_bf16()} if trains_on_cpu(device) else {}
