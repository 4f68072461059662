"""rbrm.trl_compat: one test per private TRL (or transformers `Trainer`) contact, so a TRL that renames or drops
one fails here by name rather than silently in training. (`rbrm.dpo.lm_head`'s use of TRL's patched forward and
tiled kernel is also checked against TRL's own head in tests/test_lm_head.py.)"""

from __future__ import annotations

import copy
import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from trl import DPOConfig, DPOTrainer

from rbrm.trl_compat import (
    ChunkedLogProbFunction,
    DPOTrainerHooks,
    FusedCausalLMOutput,
    global_then_local_main_first,
    without_patched_forward,
)
from tests.conftest import make_tiny_model

PAIRS = [{"prompt": "How do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Use a tension wrench.",
          "confidence": 0.9},
         {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "confidence": 0.6}]


class Recording(DPOTrainerHooks):
    """Records the public-named hooks TRL reaches through the private ones."""

    extra_columns = ("confidence",)

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        self.prepared = [*getattr(self, "prepared", []), dataset_name]
        return super().prepare_dataset(dataset, processing_class, args, dataset_name)

    def save_checkpoint_extras(self, output_dir):
        self.saved = output_dir

    def load_checkpoint_extras(self, checkpoint):
        self.loaded = checkpoint


def make_trainer(tokenizer, tmp_path, **overrides) -> Recording:
    from datasets import Dataset

    args = DPOConfig(**{"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "max_steps": 1,
                        "use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no",
                        "gradient_checkpointing": False, "disable_tqdm": True, "remove_unused_columns": False,
                        **overrides})
    # the reference: the same weights, made apart (TRL would reload one by name)
    return Recording(make_tiny_model(tokenizer), ref_model=make_tiny_model(tokenizer), args=args,
                     train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)


def batch(trainer) -> dict:
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))


@pytest.mark.parametrize("name", ["_prepare_dataset", "_set_signature_columns_if_needed",
                                  "_save_optimizer_and_scheduler", "_load_optimizer_and_scheduler"])
def test_every_overridden_private_hook_exists_with_the_same_parameters(name):
    ours, theirs = getattr(DPOTrainerHooks, name), getattr(DPOTrainer, name, None)
    assert theirs is not None, f"TRL {DPOTrainer.__module__} has no {name} any more"
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)


def test_trl_prepares_each_dataset_through_the_hook(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    assert trainer.prepared == ["train"]
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer.train_dataset.column_names)  # TRL's own


def test_extra_columns_join_trls_signature_columns(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    trainer._set_signature_columns_if_needed()
    assert "prompt_ids" in trainer._signature_columns and trainer._signature_columns[-1] == "confidence"


def test_logged_metrics_are_the_lists_trls_log_averages(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    trainer.model.train()
    trainer.logged_metrics("train")["rbrm/check"] += [1.0, 3.0]
    trainer.log({"loss": 0.5})
    assert trainer.state.log_history[-1]["rbrm/check"] == 2.0
    assert not trainer.logged_metrics("train")  # cleared by TRL after logging


def test_reference_given_makes_trls_loss_read_the_reference_from_the_batch(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    assert trainer.reference_precomputed is False
    inputs = batch(trainer)
    with torch.no_grad():
        plain = trainer.compute_loss(trainer.model, inputs)
        chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
        with trainer.reference_given():
            assert trainer.reference_precomputed is True
            same = trainer.compute_loss(trainer.model, {**inputs, "ref_chosen_logps": chosen,
                                                        "ref_rejected_logps": rejected})
            other = trainer.compute_loss(trainer.model, {**inputs, "ref_chosen_logps": chosen + 5.0,
                                                         "ref_rejected_logps": rejected})
    assert trainer.reference_precomputed is False
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(other, plain)


def test_checkpoint_hooks_run_on_save_and_on_resume(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, save_strategy="steps", save_steps=1)
    trainer.train()
    assert trainer.saved.endswith("checkpoint-1")
    resumed = make_trainer(tokenizer, tmp_path, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=trainer.saved)
    assert resumed.loaded == trainer.saved


def test_the_model_card_tags_name_rbrm(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    assert {"trl", "dpo", "rbrm"} <= set(trainer.model.model_tags)


def test_trl_patches_a_fused_forward_onto_the_model_instance(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    inputs = batch(trainer)
    assert "forward" in vars(trainer.model)  # what without_patched_forward drops
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                            fused_lm_head=True, shift_labels=None, num_items_in_batch=None)
    assert isinstance(out, FusedCausalLMOutput) and out.log_probs.shape == labels[:, 1:].shape
    assert "forward" not in vars(without_patched_forward(copy.deepcopy(trainer.model)))


def test_the_tiled_kernel_and_the_fused_output_keep_their_shape():
    params = list(inspect.signature(ChunkedLogProbFunction.forward).parameters)
    assert params == ["ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                      "final_logit_softcapping", "logit_scale", "outputs"]
    assert {"loss", "log_probs", "entropy", "mean_logits", "is_top1", "label_mask"} <= set(
        FusedCausalLMOutput.__dataclass_fields__)


def test_the_main_process_first_context_runs_in_one_process():
    with global_then_local_main_first():
        pass


def test_the_installed_trl_and_transformers_are_the_pinned_minor_these_tests_ran_on():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        pins = {Requirement(d).name: Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]}
    for name in ("trl", "transformers"):
        assert pins[name].specifier.contains(version(name)), f"{name} {version(name)} is not {pins[name]}"
        assert not pins[name].specifier.contains("99.0"), f"{name} must be pinned from above"
