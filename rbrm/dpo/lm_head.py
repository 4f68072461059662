"""Per-token log-probs of the completion tokens only, for training on devices without Triton (CPUs).

TRL's DPO trainer patches the policy with a fused LM head (`trl.trainer.utils.add_fused_lm_head`) that never holds
the `[tokens, vocab]` logits. On CUDA it scores only the labelled (completion) positions with a Triton kernel. On a
device without Triton it scores every position, prompt and padding included, and folds each vocabulary tile in
about ten element-wise torch passes. `benchmarks/bench_dpo_step.py` measures what this module saves on a CPU: a
SmolLM2-135M confidence-DPO step (LoRA, batch 4, max_length 128, 2 cores) took 7.32 s with TRL's head and 5.75 s
with this one under bf16 autocast, 10.08 and 9.34 s in fp32.

`compact_lm_head(model)` wraps TRL's patched forward: with `fused_lm_head=True` it runs the backbone, takes the
positions whose label is not -100, and computes their log-probs with one matmul and one `logsumexp`, while the
logits of those positions fit in `MAX_LOGITS` elements (TRL's tiled kernel, on the same compact positions, beyond
that). The metrics TRL logs (entropy, mean logit, top-1) are computed without gradient, as TRL's DPO only logs
them. Models whose logits are not a plain projection (soft-capping, logit scales) keep TRL's own path.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers import PreTrainedModel
from transformers.utils import is_triton_available

from ..trl_compat import ChunkedLogProbFunction, FusedCausalLMOutput

# Above this many logits (completion positions x vocabulary; 1 GiB in fp32) TRL's tiled kernel scores them instead
MAX_LOGITS = 1 << 28
TILE_VOCAB = 32768  # vocabulary tile of that kernel
METRICS = ("entropy", "mean_logits", "is_top1")  # the per-token fields TRL's DPO logs


def plain_projection(model: PreTrainedModel) -> bool:
    """True when the logits are `lm_head(hidden)` and nothing else (no soft-cap, scale or multiplier)."""
    config = model.config.get_text_config()
    return all(getattr(config, name, None) in (None, 1.0) for name in (
        "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))


def needs_compact_head(device: torch.device) -> bool:
    """TRL scores only the completion positions where Triton runs (CUDA, XPU); elsewhere this module does."""
    return not (is_triton_available() and device.type in ("cuda", "xpu"))


def completion_log_probs(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor) -> tuple:
    """(log_probs, entropy, mean_logits, is_top1) of `labels` [n] under `lm_head(hidden)` for hidden [n, H]."""
    if labels.numel() * lm_head.weight.shape[0] > MAX_LOGITS:
        log_probs, entropy, _, mean_logits, is_top1 = ChunkedLogProbFunction.apply(
            hidden, lm_head.weight, lm_head.bias, labels, 1.0, TILE_VOCAB, None, 1.0, ("log_probs", *METRICS))
        return log_probs, entropy.detach(), mean_logits, is_top1
    logits = lm_head(hidden).float()
    log_z = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_z
    with torch.no_grad():
        entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        is_top1 = logits.argmax(-1) == labels  # the first maximum, as TRL counts ties
        return log_probs, entropy, logits.mean(-1), is_top1


def compact_lm_head(model: PreTrainedModel) -> bool:
    """Wrap the forward TRL's `add_fused_lm_head` put on `model` (see the module docstring). False, and nothing
    changed, when the model's logits are not a plain projection."""
    if not plain_projection(model):
        return False
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or getattr(self.config, "output_router_logits", False):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        lm_head = self.get_output_embeddings()
        labels = labels[:, 1:].to(lm_head.weight.device)
        mask = labels != -100
        scored = completion_log_probs(hidden.to(lm_head.weight.device)[mask], lm_head, labels[mask])
        # scattered back to [batch, seq_len - 1], zero elsewhere; `masked_scatter` keeps an all-masked batch
        # connected to the model, as TRL does
        log_probs, entropy, mean_logits, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in scored)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True
