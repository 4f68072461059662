"""Every contact rbrm has with what TRL (and transformers' `Trainer` under it) does not publish, in one module.

`ConfidenceDPOTrainer` needs TRL's DPO trainer at points TRL has no public hook for: the dataset preparation, the
columns its collator keeps, the metrics its `log` averages, its precomputed-reference switch, and `Trainer`'s
checkpoint save and load. `rbrm.dpo.lm_head` wraps the fused LM-head forward TRL patches onto the policy and uses
the kernel and output class behind it. TRL rewrites these internals between
minor versions, so pyproject.toml pins the tested minor, and tests/test_trl_compat.py checks each name used here
still exists with the shape used: a TRL that renames one fails there, not silently in training. No other rbrm
module names a private TRL attribute (tests/test_layers.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from trl import DPOTrainer
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.trainer.utils import FusedCausalLMOutput, global_then_local_main_first

__all__ = ["ChunkedLogProbFunction", "DPOTrainerHooks", "FusedCausalLMOutput", "global_then_local_main_first",
           "without_patched_forward"]


def without_patched_forward(model: nn.Module) -> nn.Module:
    """Drop the forward a DPO trainer patched onto this instance (TRL's fused LM head, which closes over the model
    it was patched on: on a deep copy it would still run the original)."""
    model.__dict__.pop("forward", None)
    return model


class DPOTrainerHooks(DPOTrainer):
    """TRL's `DPOTrainer` with each private hook rbrm needs forwarded to a public-named method a subclass overrides,
    and TRL's private state read or switched through methods here."""

    _tag_names = [*DPOTrainer._tag_names, "rbrm"]  # the model card's tags
    extra_columns: tuple[str, ...] = ()  # dataset columns kept for the collator besides TRL's own

    # ------------------------------------------------------------------------------------- data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.prepare_dataset(dataset, processing_class, args, dataset_name)

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenisation (called from TRL's `__init__` for every dataset); a subclass may render its own."""
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in self.extra_columns:
            if column not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, column]

    # ------------------------------------------------------------------------------ loss state

    def logged_metrics(self, mode: str) -> dict[str, list[float]]:
        """The lists TRL's `log` averages and clears at each logging step ("train" or "eval")."""
        return self._metrics[mode]

    @property
    def reference_precomputed(self) -> bool:
        """TRL's loss takes the reference log-probs from the batch (`precompute_ref_log_probs`, or set for a call
        by `reference_given`) instead of running the reference."""
        return self.precompute_ref_logps

    @contextlib.contextmanager
    def reference_given(self) -> Iterator[None]:
        """Within: TRL's loss reads `ref_chosen_logps` and `ref_rejected_logps` from the inputs."""
        precomputed = self.precompute_ref_logps
        self.precompute_ref_logps = True
        try:
            yield
        finally:
            self.precompute_ref_logps = precomputed

    # ---------------------------------------------------------------------------- checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self.save_checkpoint_extras(output_dir)

    def save_checkpoint_extras(self, output_dir: str) -> None:
        """Called in every checkpoint folder, after the optimiser and scheduler state."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        self.load_checkpoint_extras(checkpoint)

    def load_checkpoint_extras(self, checkpoint: str | None) -> None:
        """Called on resume on every rank (DeepSpeed included), after the optimiser and scheduler state."""
