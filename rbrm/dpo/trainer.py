"""DPO with per-pair preference confidence from the hybrid reward on the policy's own hidden states.

docs/method.md §4. `ConfidenceDPOTrainer` is a small subclass of TRL's `DPOTrainer` (TRL 1.16, pinned), through
`rbrm.trl_compat`, which holds every private TRL hook and attribute it needs:

* `rbrm.features.capture_pooled`, the hooks feature extraction uses, installed around TRL's one policy forward and
  removed right after it (gradient checkpointing's recomputation never fires them), pools every probed layer's
  output at the end-of-turn token of each completion (or the mean over the completion). No second forward.
* gamma = max(sigmoid(alpha (r_c - r_r)), floor), detached; the loss per pair is
  -gamma log sigmoid(beta D) - (1 - gamma) log sigmoid(-beta D). Because log sigmoid(-x) = log sigmoid(x) - x,
  that is TRL's own `sigmoid` loss plus (1 - gamma) beta D, so TRL computes everything it always does and this
  class adds one exact per-pair correction term. It needs the per-pair reference log-probs, so the reference
  forward runs through TRL's `compute_ref_log_probs` first and is handed to TRL's `compute_loss` like
  precomputed ones: still one reference forward and one policy forward per batch.
* SafeDPO (Kim et al., ICLR 2026; `rbrm.dpo.safedpo`), with `confidence="none"` and `safety_margin` Delta > 0:
  the loss per pair is -log sigmoid(beta D - m Delta), m the pair's `safety_margin` column. The same way, TRL's
  `sigmoid` loss plus the exact per-pair correction -log sigmoid(beta D - m Delta) + log sigmoid(beta D).
* On a device without Triton (a CPU), TRL's fused LM head scores every position with a slow tiled fallback; the
  policy and reference get `rbrm.dpo.lm_head`'s head instead, which scores only the completion tokens
  (`compact_lm_head`, on by default; the same log-probs and gradients up to rounding).
* The probe keeps learning on the same detached states: its own optimiser (SGD, or the paper's Adam:
  `reward_optimizer`), gradients accumulated over micro-steps, one step per optimiser step, all-reduced (mean)
  across ranks so every rank holds the same probe. It is saved in every checkpoint (`reward_model/` + its
  optimiser state), restored on resume and saved beside the final model as `<output_dir>/reward_model/`.

Data: `rbrm.dpo.data` (the token contract of `rbrm.render`).

Running on GPUs: the trainer is a plain TRL trainer, so launch `rbrm dpo` (or `dpo.py`) as TRL scripts are:

    accelerate launch --config_file $(python -c "import trl, os; print(os.path.dirname(trl.__file__))")/accelerate_configs/zero2.yaml \\
        -m rbrm.cli dpo --model M --pairs pairs.jsonl --reward RM_DIR --output_dir D --bf16
    torchrun --nproc_per_node 8 -m rbrm.cli dpo --model M --pairs pairs.jsonl --reward RM_DIR --output_dir D

TRL ships `multi_gpu.yaml`, `zero1.yaml`, `zero2.yaml`, `zero3.yaml`, `fsdp1.yaml` and `fsdp2.yaml` in
`trl/accelerate_configs/`. The probe is tiny and is not sharded: each rank keeps a full copy, kept identical by the
gradient all-reduce. (Only DDP on CPU, `torchrun --nproc_per_node 2`, was tested here; DeepSpeed and FSDP were not.)
"""

from __future__ import annotations

import copy
import json
import logging
import os

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast, is_peft_model
from datasets import Dataset
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled
from trl.data_utils import extract_prompt

from ..features import POOLINGS, capture_pooled, context_length
from ..files import write_json
from ..flops import ModelShape, forward_flops, probe_flops, training_flops
from ..layout import CONFIDENCE_FILE
from ..reward_model import HybridRewardModel, pairwise_loss
from ..trl_compat import DPOTrainerHooks, global_then_local_main_first, without_patched_forward
from .config import ConfidenceDPOConfig
from .data import EXTRA_KEYS, ConfidenceCollator, render_and_tokenize
from .lm_head import compact_lm_head, needs_compact_head

log = logging.getLogger(__name__)

REWARD_DIR = "reward_model"
REWARD_OPTIMIZER_FILE = "optimizer.pt"
# Above this share of pairs whose end-of-turn token is cut off by max_length, the trainer warns at the start.
TRUNCATION_WARN_FRACTION = 0.1
COMPUTE_FILE = "rbrm_compute.json"  # in each checkpoint: the forward-token count so far, restored on resume
# CONFIDENCE_FILE (rbrm.layout), in each checkpoint and the final model: every training pair's gamma so far, in order


# ----------------------------------------------------------------------------------- hidden states


class _PolicyCall:
    """Stands in for the policy in TRL's `compute_loss`: its one fused forward runs inside `capture_pooled`.

    The hooks live only for that call, so neither the reference forward (the same modules under PEFT) nor
    gradient checkpointing's recomputation in backward fires them.
    """

    def __init__(self, model: nn.Module, unwrapped: nn.Module, layers: list[int], mask: torch.Tensor, pooling: str):
        self.model, self.unwrapped, self.layers, self.pooling = model, unwrapped, layers, pooling
        self.mask_ref = {"mask": mask}
        self.pooled: dict[int, torch.Tensor] = {}
        self.output = None

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        if self.output is not None or not kwargs.get("fused_lm_head"):
            return self.model(*args, **kwargs)  # e.g. the deprecated logits recomputation
        with capture_pooled(self.unwrapped, self.layers, self.pooling, self.mask_ref) as captured:
            self.output = self.model(*args, **kwargs)
        self.pooled = dict(captured)
        return self.output

    def features(self) -> torch.Tensor:
        """[2B, L, d] float32, rows [chosen; rejected]."""
        missing = [layer for layer in self.layers if layer not in self.pooled]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run in the policy forward")
        return torch.stack([self.pooled[layer].float() for layer in self.layers], 1)


def _zero3_enabled() -> bool:
    return is_deepspeed_zero3_enabled()


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    """True when two modules hold the same parameter storage (the policy, or a view of it, as its own reference)."""
    ptrs = {p.data_ptr() for p in a.parameters() if p.numel()}
    return any(p.numel() and p.data_ptr() in ptrs for p in b.parameters())

# ------------------------------------------------------------------------------------------ trainer


class ConfidenceDPOTrainer(DPOTrainerHooks):
    """TRL's DPOTrainer with per-pair preference confidence and an online hybrid-reward update.

    Extra argument: `reward_model`, a `HybridRewardModel` or the folder it was saved to (required for
    `confidence="online"`; optional otherwise, where it is still evaluated, logged and updated).
    The reference is a frozen copy of the initial policy made here when none is given (TRL would reload one from
    `config._name_or_path`, which fails for in-memory models), the adapter-disabled base model under PEFT (TRL),
    or precomputed log-probs with `precompute_ref_log_probs=True`.
    """

    extra_columns = ("confidence", "benign", "safety_margin")

    def __init__(self, model, ref_model=None, args: ConfidenceDPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None,
                 reward_model: HybridRewardModel | str | None = None):
        if args is None:
            args = ConfidenceDPOConfig("confidence-dpo")
        if not isinstance(args, ConfidenceDPOConfig):
            raise TypeError(f"args must be a ConfidenceDPOConfig, got {type(args).__name__}")
        if isinstance(reward_model, (str, os.PathLike)):
            reward_model = HybridRewardModel.load(os.fspath(reward_model))
        if args.confidence == "online" and reward_model is None:
            raise ValueError("confidence='online' needs a reward_model (a HybridRewardModel or its folder)")
        if reward_model is not None and reward_model.pooling not in POOLINGS:
            raise ValueError(f"reward model pooling {reward_model.pooling!r} is not one of {POOLINGS}")
        if (args.confidence == "online" and args.confidence_scale == "calibrated"
                and "calibration" not in reward_model.config):
            raise ValueError("confidence_scale='calibrated' needs a probe with a calibrated scale: this one was "
                             "saved before rbrm 0.3; retrain it with `rbrm probe train`, or set "
                             "confidence_scale='alpha'")
        if args.confidence != "none" or args.safety_margin:
            self._check_loss_settings(args)

        if ref_model is not None and not isinstance(model, str) and (
                ref_model is model or _shares_parameters(model, ref_model)):
            raise ValueError("ref_model is the policy itself (or shares its weights): the DPO margin would always "
                             "be 0. Pass a separate frozen copy, pass nothing (a copy of the initial policy is "
                             "made), or use precompute_ref_log_probs=True.")
        if (ref_model is None and not isinstance(model, str) and peft_config is None
                and not is_peft_model(model) and not args.precompute_ref_log_probs and not _zero3_enabled()):
            ref_model = self._frozen_copy(model)  # (under ZeRO-3 the weights are sharded: TRL reloads instead)

        self._context_length = context_length(model) if isinstance(model, nn.Module) else None
        self.pair_counts: dict[str, dict[str, int]] = {}  # per dataset: pairs dropped or truncated, and why
        # Set before TRL's __init__, whose precompute pass (precompute_ref_log_probs) already counts.
        self.forward_tokens = 0  # this rank's training tokens through the policy and reference (compute ledger)
        self.flops = 0  # and their FLOPs: policy forward + backward, reference forward, probe (rbrm.flops)
        self._shape: ModelShape | None = None
        self._adapters: int | None = None
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)

        if args.compact_lm_head and needs_compact_head(self.accelerator.device):
            for patched in (self.model.get_base_model() if is_peft_model(self.model) else self.model, self.ref_model):
                if patched is not None:
                    compact_lm_head(patched)
        # Wrapped after TRL's precompute pass, which needs only the standard keys.
        self.data_collator = ConfidenceCollator(self.data_collator, args.max_length, args.truncation_mode)
        self.reward_model = reward_model
        self.reward_optimizer = None
        self.probe_steps = 0
        self.last_confidence: torch.Tensor | None = None  # per pair, last batch (for inspection)
        self.confidence_history: list[float] = []  # every training pair's gamma, in order (rank 0's gather)
        self.confidence_scale = (reward_model.calibration["scale"] if reward_model is not None
                                 and args.confidence_scale == "calibrated" else args.confidence_alpha)
        self.last_features: torch.Tensor | None = None  # [2B, L, d] pooled, last batch (for inspection)
        if reward_model is not None:
            reward_model.check_model(self.accelerator.unwrap_model(self.model),
                                     getattr(self.processing_class, "tokenizer", self.processing_class))
            self.reward_model = reward_model.to(self.accelerator.device, torch.float32)
            if self.accelerator.num_processes > 1:  # every rank starts from rank 0's probe
                for tensor in self.reward_model.state_dict().values():
                    tensor.copy_(broadcast(tensor.clone(), from_process=0))
            optimizer = torch.optim.Adam if args.reward_optimizer == "adam" else torch.optim.SGD
            self.reward_optimizer = optimizer(self._probe_parameters(), lr=args.reward_lr)
        if args.confidence == "static" and "confidence" not in (getattr(self.train_dataset, "column_names", None)
                                                                or ["confidence"]):
            raise ValueError("confidence='static' needs a `confidence` column in the training pairs "
                             "(written by `rbrm rerank`)")
        if args.safety_margin and "safety_margin" not in (getattr(self.train_dataset, "column_names", None)
                                                          or ["safety_margin"]):
            raise ValueError(f"safety_margin={args.safety_margin} (SafeDPO) needs a `safety_margin` column in the "
                             "training pairs (rbrm.dpo.safedpo.load_safedpo_rows)")

    @staticmethod
    def _check_loss_settings(args: ConfidenceDPOConfig) -> None:
        """The confidence and safety-margin terms are exact corrections to TRL's `sigmoid` loss on plain
        log-ratios; refuse what would change that loss."""
        who = (f"confidence={args.confidence!r}" if args.confidence != "none"
               else f"safety_margin={args.safety_margin}")
        if "sigmoid" not in args.loss_type:
            what, hint = (("puts its margin inside", "SafeDPO is defined on it") if args.safety_margin
                          else ("weights", "use confidence='none' for other losses"))
            raise ValueError(f"{who} {what} the `sigmoid` DPO loss; loss_type {args.loss_type} has none ({hint})")
        for name, value, default in (("f_divergence_type", args.f_divergence_type, "reverse_kl"),
                                     ("ld_alpha", args.ld_alpha, None), ("use_weighting", args.use_weighting, False)):
            if value != default:
                raise ValueError(f"{who} is not implemented with {name}={value!r}")

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        ref = without_patched_forward(copy.deepcopy(model))  # one patched by an earlier trainer
        ref.eval().requires_grad_(False)
        return ref

    # ------------------------------------------------------------------------------------- data

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Render/tokenise with `rbrm.render` (same tokens as the probe); keeps extra columns such as confidence."""
        first = next(iter(dataset))
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(first):
            return dataset  # tokenised already (e.g. by this method)
        map_kwargs: dict = {}
        if isinstance(dataset, Dataset):  # IterableDataset takes neither num_proc nor desc
            map_kwargs["num_proc"] = args.dataset_num_proc
        with global_then_local_main_first():
            if "prompt" not in first:
                dataset = dataset.map(extract_prompt, **map_kwargs)
            if isinstance(dataset, Dataset):
                map_kwargs["desc"] = f"Rendering and tokenizing {dataset_name} dataset"
            tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor's, as TRL's
            dataset = dataset.map(render_and_tokenize, fn_kwargs={"tokenizer": tokenizer}, **map_kwargs)
            context = getattr(self, "_context_length", None)
            max_length = args.max_length
            if context is not None and (max_length is None or max_length > context):
                # Sequences are not cut to fit the window: pairs past the model's context would train on noise.
                dataset = self._drop(dataset, lambda e: len(e["prompt_ids"]) + max(
                    len(e["chosen_ids"]), len(e["rejected_ids"])) <= context, map_kwargs, dataset_name,
                    "too_long", f"longer than the model's context of {context} tokens")
            if max_length is not None and args.truncation_mode == "keep_start":
                before = len(dataset) if isinstance(dataset, Dataset) else None
                dataset = self._drop(dataset, lambda e: len(e["prompt_ids"]) < max_length, map_kwargs, dataset_name,
                                     "prompt_too_long",
                                     f"with a prompt of max_length={max_length} tokens or more (nothing to learn)")
                if before and not len(dataset):
                    raise ValueError(f"{dataset_name} dataset: all {before} pairs have a prompt of max_length="
                                     f"{max_length} tokens or more, so nothing is left to train on; raise "
                                     "max_length or use shorter prompts")
                if isinstance(dataset, Dataset) and len(dataset):
                    self._warn_truncation(dataset, max_length, dataset_name)
        return dataset

    def _drop(self, dataset, keep, map_kwargs: dict, dataset_name: str, reason: str, why: str):
        """`dataset.filter(keep)`, saying how many pairs went and why (TRL drops them without a word);
        the counts are kept in `self.pair_counts[dataset_name]` for the run's summary."""
        kwargs = dict(map_kwargs)
        if isinstance(dataset, Dataset):
            kwargs["desc"] = f"Dropping pairs {why.split(' (')[0]} from {dataset_name} dataset"
        before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = dataset.filter(keep, **kwargs)
        if before is not None and len(dataset) < before:
            log.warning("%s dataset: dropped %d of %d pairs %s", dataset_name, before - len(dataset), before, why)
            self.pair_counts.setdefault(dataset_name, {})[f"dropped_{reason}"] = before - len(dataset)
        return dataset

    def _warn_truncation(self, dataset, max_length: int, dataset_name: str) -> None:
        """Warn once when many pairs lose their end-of-turn token to `max_length`: the probe reads that token,
        so those pairs keep confidence 1 and teach the online probe nothing."""
        prompt = [len(x) for x in dataset["prompt_ids"]]
        cut = sum(p + max(len(c), len(r)) > max_length
                  for p, c, r in zip(prompt, dataset["chosen_ids"], dataset["rejected_ids"]))
        self.pair_counts.setdefault(dataset_name, {})["endpoint_truncated"] = cut
        if cut > TRUNCATION_WARN_FRACTION * len(prompt):
            log.warning("%s dataset: %d of %d pairs (%.0f%%) lose their end-of-turn token to max_length=%d; "
                           "the probe cannot read them, so their confidence stays 1 and the probe does not learn "
                           "from them. Raise max_length.", dataset_name, cut, len(prompt), 100 * cut / len(prompt),
                           max_length)

    def compute_ref_log_probs(self, model, inputs):
        if self.reference_precomputed:  # TRL's precompute pass; the in-loss call in compute_loss runs with it off
            lengths = inputs["attention_mask"].sum(1).tolist()
            self.forward_tokens += int(sum(lengths))
            self.flops += forward_flops(ModelShape.of(self.accelerator.unwrap_model(model)), lengths)
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in EXTRA_KEYS})

    # ------------------------------------------------------------------------------------- loss

    def _count_compute(self, attention_mask: torch.Tensor) -> None:
        """Tokens and FLOPs of one training micro-batch: the policy's forward and backward (LoRA: no weight
        gradients for the frozen weights; a recomputed forward under gradient checkpointing), the reference's
        forward unless TRL precomputed it, and the probe with its update."""
        if self._shape is None:  # the policy's shape and its trained adapters do not change during training
            model = self.accelerator.unwrap_model(self.model)
            self._shape = ModelShape.of(model)
            self._adapters = sum(p.numel() for p in model.parameters() if p.requires_grad) \
                if hasattr(model, "peft_config") else None  # None: full fine-tuning
        lengths, adapters = attention_mask.sum(1).tolist(), self._adapters
        forwards = 1 if self.reference_precomputed else 2  # policy, and the reference unless precomputed
        self.forward_tokens += forwards * int(sum(lengths))
        self.flops += training_flops(self._shape, lengths, adapters)
        if self.args.gradient_checkpointing:
            self.flops += forward_flops(self._shape, lengths)
        if not self.reference_precomputed:
            self.flops += forward_flops(self._shape, lengths)
        if self.reward_model is not None:
            probe = self.reward_model
            self.flops += probe_flops(probe.num_layers, probe.weight.shape[1], len(lengths), self.args.reward_update)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        extra = {key: inputs.pop(key, None) for key in EXTRA_KEYS}
        if self.model.training:
            self._count_compute(inputs["attention_mask"])
        mode_confidence = self.args.confidence
        probe = self.reward_model
        safety_margin = self.args.safety_margin  # SafeDPO's Delta (0: off)
        if probe is None and mode_confidence == "none" and not safety_margin:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        completion_mask = inputs["completion_mask"]
        n_pairs = completion_mask.shape[0] // 2
        kept = extra["endpoint_kept"]
        kept = torch.ones(2 * n_pairs, dtype=torch.bool) if kept is None else kept.bool()
        pair_kept = (kept[:n_pairs] & kept[n_pairs:]).to(completion_mask.device)
        # Pairs ranked by the helpfulness reward (benign prompts): the safety probe neither weighs nor learns them.
        benign = extra["benign"]
        benign = (torch.zeros(n_pairs, dtype=torch.bool) if benign is None else benign.bool()).to(pair_kept.device)
        safety_kept = pair_kept & ~benign

        layers = probe.layers if probe is not None else []
        policy = _PolicyCall(model, self.accelerator.unwrap_model(model), layers, completion_mask,
                             probe.pooling if probe else "last")

        # The confidence and safety-margin terms need the per-pair reference log-probs: compute them with TRL's own
        # method and hand them over as precomputed, so TRL skips its reference forward (one reference forward
        # either way).
        per_pair_terms = mode_confidence != "none" or bool(safety_margin) or bool(self.args.sft_benign)
        if per_pair_terms and not self.reference_precomputed:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.compute_ref_log_probs(ref_model, inputs)
            with self.reference_given():
                result = super().compute_loss(policy, inputs, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(policy, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)

        metrics = self.logged_metrics("train" if self.model.training else "eval")
        reward_gap = None
        if probe is not None:
            features = policy.features()
            self.last_features = features
            reward_gap = self._probe_metrics_and_update(features, safety_kept, metrics)
        if per_pair_terms:
            delta = self._log_ratio_gap(policy, inputs, completion_mask)
            weight = self.loss_weights[self.loss_types.index("sigmoid")]
        if safety_margin:
            loss = loss + weight * self._safety_margin_term(delta, extra["safety_margin"], metrics)
        if self.args.sft_benign:
            loss = loss + self.args.sft_benign * self._benign_nll(policy, completion_mask, benign, metrics)
        if mode_confidence != "none":
            gamma = self._confidence(reward_gap, extra["confidence"], safety_kept, benign, n_pairs,
                                     completion_mask.device)
            self.last_confidence = gamma
            # -g ls(bD) - (1-g) ls(-bD) = -ls(bD) + (1-g) bD, and TRL's loss already holds -ls(bD).
            loss = loss + weight * ((1.0 - gamma.to(delta.dtype)) * self.beta * delta).mean()
            gathered = self.accelerator.gather(gamma)
            metrics["confidence/mean"].append(gathered.mean().item())
            if self.model.training:
                self.confidence_history += gathered.float().tolist()
            metrics["confidence/std"].append(gathered.std().item() if gathered.numel() > 1 else 0.0)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _completion_logps(policy: _PolicyCall, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob, token count) of each row's completion [chosen rows; rejected rows], from TRL's own policy
        forward, summed as TRL sums them (ld_alpha is None)."""
        seq_len = completion_mask.size(1) - 1
        return policy.output.log_probs[:, -seq_len:].sum(dim=1), completion_mask[:, -seq_len:].sum(dim=1)

    @classmethod
    def _log_ratio_gap(cls, policy: _PolicyCall, inputs: dict, completion_mask: torch.Tensor) -> torch.Tensor:
        """D per pair: log pi/pi_ref of the chosen minus that of the rejected, from the log-probs of TRL's own
        policy forward and the reference log-probs handed to it."""
        chosen_logps, rejected_logps = cls._completion_logps(policy, completion_mask)[0].chunk(2, dim=0)
        return (chosen_logps - inputs["ref_chosen_logps"]) - (rejected_logps - inputs["ref_rejected_logps"])

    @classmethod
    def _benign_nll(cls, policy: _PolicyCall, completion_mask: torch.Tensor, benign: torch.Tensor,
                    metrics) -> torch.Tensor:
        """The chosen answers' per-token negative log-likelihood on benign pairs, summed and divided by all the
        batch's pairs (0 for a safety pair), from TRL's own policy forward."""
        n_pairs = completion_mask.shape[0] // 2
        logps, tokens = cls._completion_logps(policy, completion_mask)
        nll = -logps[:n_pairs] / tokens[:n_pairs].clamp(min=1)
        if benign.any():
            metrics["sft_benign/nll"].append(nll[benign].mean().item())
        return (nll * benign.to(nll.dtype)).sum() / n_pairs

    def _safety_margin_term(self, delta: torch.Tensor, margins: torch.Tensor | None, metrics) -> torch.Tensor:
        """SafeDPO's loss minus TRL's sigmoid loss, averaged over the pairs: -ls(bD - m Delta) + ls(bD), so that
        TRL's loss plus this is SafeDPO's -ls(bD - m Delta) (rbrm.dpo.safedpo); 0 on pairs with m = 0."""
        if margins is None:
            raise ValueError(f"safety_margin={self.args.safety_margin} (SafeDPO) needs a `safety_margin` value on "
                             "every pair, evaluation pairs included (rbrm.dpo.safedpo.load_safedpo_rows)")
        shift = margins.to(delta.device, delta.dtype) * self.args.safety_margin
        scaled = self.beta * delta
        metrics["safedpo/margin_pairs"].append(self.accelerator.gather(margins.to(delta.device)).mean().item())
        return (F.softplus(shift - scaled) - F.softplus(-scaled)).mean()  # -ls(x) = softplus(-x)

    def _confidence(self, reward_gap: torch.Tensor | None, column: torch.Tensor | None, pair_kept: torch.Tensor,
                    benign: torch.Tensor, n_pairs: int, device) -> torch.Tensor:
        """Per-pair gamma (detached). Online pairs that lost their endpoint to truncation keep their label (1);
        benign pairs (ranked by the helpfulness reward) take `confidence_benign`, or else their `confidence` column,
        as static mode does."""
        args = self.args
        if args.confidence_benign is not None and benign.any():
            others = self._confidence(reward_gap, column, pair_kept, torch.zeros_like(benign), n_pairs, device)
            return torch.where(benign, torch.full_like(others, args.confidence_benign), others)

        def from_column(who: str) -> torch.Tensor:
            if column is None:
                raise ValueError(f"{who} needs a `confidence` value on every pair (written by `rbrm rerank`)")
            return column.to(device, torch.float32).clamp(min=args.confidence_floor, max=1.0)

        if args.confidence == "static":
            return from_column("confidence='static'")
        gamma = torch.sigmoid(self.confidence_scale * reward_gap)
        if args.confidence_batch_mean:
            value = gamma[pair_kept].mean() if pair_kept.any() else gamma.new_ones(())
            gamma = value.expand(n_pairs)
        gamma = torch.where(pair_kept, gamma.clamp(min=args.confidence_floor), torch.ones_like(gamma))
        return torch.where(benign, from_column("a pair of kind `benign`"), gamma) if benign.any() else gamma

    def _probe_metrics_and_update(self, features: torch.Tensor, pair_kept: torch.Tensor, metrics) -> torch.Tensor:
        """r_c - r_r per pair (before this batch's update); accumulates the probe's gradient when training."""
        probe, args = self.reward_model, self.args
        n_pairs = features.shape[0] // 2
        with torch.autocast(features.device.type, enabled=False):
            with torch.no_grad():
                reward = probe(features)
            gap = reward[:n_pairs] - reward[n_pairs:]
            kept = pair_kept.float()
            loss_value = features.new_zeros(())
            if pair_kept.any():
                with torch.enable_grad():
                    chosen, rejected = features[:n_pairs][pair_kept], features[n_pairs:][pair_kept]
                    s_c, s_r = probe.layer_scores(chosen), probe.layer_scores(rejected)
                    loss = pairwise_loss(probe.reward_from_scores(s_c), probe.reward_from_scores(s_r),
                                         args.reward_margin)
                    if args.reward_layer_loss_weight:
                        loss = loss + args.reward_layer_loss_weight * pairwise_loss(s_c, s_r, args.reward_margin)
                loss_value = loss.detach()
                if self.model.training and args.reward_update and torch.is_grad_enabled():
                    steps = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
                    (loss / steps).backward()
        counts = torch.stack([((gap > 0).float() * kept).sum(), ((gap < 0).float() * kept).sum(), kept.sum(),
                              loss_value * kept.sum(), (gap * kept).sum(), torch.tensor(float(n_pairs),
                                                                                     device=gap.device)])
        total = self.accelerator.gather(counts[None]).sum(0)
        n_kept = total[2].item()
        if n_kept:
            metrics["probe/accuracy"].append(total[0].item() / n_kept)
            metrics["probe/reversed"].append(total[1].item() / n_kept)
            metrics["probe/loss"].append(total[3].item() / n_kept)
            metrics["probe/reward_gap"].append(total[4].item() / n_kept)
        metrics["probe/truncated"].append(1.0 - n_kept / max(total[5].item(), 1.0))
        return gap.detach()

    # ------------------------------------------------------------------------------ probe steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.reward_optimizer is not None and self.args.reward_update and self.accelerator.sync_gradients:
            self._probe_step()
        return loss

    def _probe_step(self) -> None:
        """One optimiser step (Adam or SGD) on the gradient accumulated since the last one, averaged over ranks first."""
        params = self._probe_parameters()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.accelerator.num_processes > 1:
            self._all_reduce_probe_grads(params)
        self.reward_optimizer.step()
        self.reward_optimizer.zero_grad(set_to_none=True)
        self.probe_steps += 1

    def _probe_parameters(self) -> list[nn.Parameter]:
        """What the online update trains: everything but a frozen gate (the bias of `vote`, all of `mean`)."""
        return [p for p in self.reward_model.parameters() if p.requires_grad]

    def _all_reduce_probe_grads(self, params: list[nn.Parameter]) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    # ---------------------------------------------------------------------------- persistence

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy as TRL saves it, and the probe beside it in `<output_dir>/reward_model/`."""
        super().save_model(output_dir, _internal_call)
        if self.reward_model is not None and self.args.should_save:
            self.reward_model.config["dpo"] = {"global_step": int(self.state.global_step),
                                               "probe_steps": self.probe_steps,
                                               "confidence": self.args.confidence}
            self.reward_model.save(os.path.join(output_dir or self.args.output_dir, REWARD_DIR))
        if self.args.should_save and self.args.confidence != "none":
            self._write_confidence(output_dir or self.args.output_dir)

    def _write_confidence(self, directory: str) -> None:
        write_json(os.path.join(directory, CONFIDENCE_FILE), {"scale": self.confidence_scale,
                                                              "gamma": self.confidence_history})

    def save_checkpoint_extras(self, output_dir: str) -> None:
        """The compute ledger, the gammas so far, and the probe's optimiser state."""
        if self.args.should_save:
            write_json(os.path.join(output_dir, COMPUTE_FILE), {"forward_tokens": self.forward_tokens,
                                                                "flops": self.flops})
        if self.args.should_save and self.args.confidence != "none":
            self._write_confidence(output_dir)
        if self.reward_optimizer is not None and self.args.should_save:
            directory = os.path.join(output_dir, REWARD_DIR)
            os.makedirs(directory, exist_ok=True)
            torch.save({"optimizer": self.reward_optimizer.state_dict(), "probe_steps": self.probe_steps},
                       os.path.join(directory, REWARD_OPTIMIZER_FILE))

    def load_checkpoint_extras(self, checkpoint: str | None) -> None:
        """On resume, on every rank: the compute ledger, the gammas, the probe and its optimiser state."""
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, COMPUTE_FILE)):
            with open(os.path.join(checkpoint, COMPUTE_FILE)) as f:
                saved = json.load(f)
            self.forward_tokens, self.flops = int(saved["forward_tokens"]), int(saved.get("flops", 0))
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, CONFIDENCE_FILE)):
            with open(os.path.join(checkpoint, CONFIDENCE_FILE)) as f:
                self.confidence_history = [float(g) for g in json.load(f)["gamma"]]
        if checkpoint is None or self.reward_model is None:
            return
        directory = os.path.join(checkpoint, REWARD_DIR)
        if not os.path.isdir(directory):
            log.warning("checkpoint %s holds no %s/: the probe starts from the one given", checkpoint, REWARD_DIR)
            return
        saved = HybridRewardModel.load(directory, map_location=self.accelerator.device)
        self.reward_model.load_state_dict(saved.state_dict())
        state_path = os.path.join(directory, REWARD_OPTIMIZER_FILE)
        if os.path.isfile(state_path):
            state = torch.load(state_path, map_location=self.accelerator.device, weights_only=True)
            self.reward_optimizer.load_state_dict(state["optimizer"])
            self.probe_steps = int(state.get("probe_steps", 0))
