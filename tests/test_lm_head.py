"""rbrm.dpo.lm_head: the completion-only LM head gives TRL's fused head's outputs and gradients; DPO uses it on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

import rbrm.dpo.lm_head as lm_head
from tests.conftest import make_tiny_model
from tests.test_trainer import config, dataset

FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1")


def batch(tokenizer, vocab: int):
    """Two rows, the second left-padded, with the first positions of each labelled -100 like a prompt."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    labels = input_ids.clone()
    labels[0, :5] = -100
    labels[1, :7] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def outputs_and_grads(model, inputs, labels):
    model.zero_grad()
    out = model(**inputs, labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + out.loss).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("tiled", [False, True])
def test_compact_head_matches_trls_head(tokenizer, monkeypatch, tiled):
    if tiled:  # the large-logits branch: TRL's tiled kernel on the compact positions
        monkeypatch.setattr(lm_head, "MAX_LOGITS", 0)
    trl_model = make_tiny_model(tokenizer)
    ours = copy.deepcopy(trl_model)
    for model in (trl_model, ours):
        add_fused_lm_head(model, outputs=FIELDS)
    assert lm_head.compact_lm_head(ours)
    inputs, labels = batch(tokenizer, trl_model.config.vocab_size)
    expected, expected_grads = outputs_and_grads(trl_model, inputs, labels)
    got, grads = outputs_and_grads(ours, inputs, labels)
    assert torch.equal(got.label_mask, expected.label_mask)
    for name in FIELDS:
        if name == "is_top1":
            assert torch.equal(getattr(got, name), getattr(expected, name))
        else:
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-5)
    assert expected_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-6)
    # outside fused_lm_head the model's own forward runs (generation, plain logits)
    logits = ours(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, trl_model.config.vocab_size)


def test_models_with_scaled_logits_keep_trls_head(tokenizer):
    model = make_tiny_model(tokenizer)
    model.config.final_logit_softcapping = 30.0
    add_fused_lm_head(model)
    before = model.forward
    assert not lm_head.plain_projection(model)
    assert not lm_head.compact_lm_head(model)
    assert model.forward is before


def test_dpo_on_cpu_uses_the_compact_head_with_trls_loss(tokenizer, tmp_path, monkeypatch):
    """One DPO step with and without the compact head: the compact one is really called, and the loss and the
    trained LoRA weights agree."""
    from peft import LoraConfig

    from rbrm.dpo import ConfidenceDPOTrainer

    calls = []
    original = lm_head.completion_log_probs
    monkeypatch.setattr(lm_head, "completion_log_probs", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    results = {}
    for compact in (True, False):
        trainer = ConfidenceDPOTrainer(
            make_tiny_model(tokenizer), args=config(tmp_path / str(compact), max_steps=1, confidence="none",
                                                    compact_lm_head=compact),
            train_dataset=dataset(tokenizer, 4, confidence=False), processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        trainer.train()
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        results[compact] = (trainer.state.log_history[0]["loss"], lora)
        if compact:
            assert calls, "the compact head was not used"
            n_calls = len(calls)
    assert len(calls) == n_calls  # the run with TRL's head did not go through it
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-4, abs=1e-6)
    for name, weight in results[True][1].items():
        torch.testing.assert_close(weight, results[False][1][name], rtol=1e-3, atol=1e-5)
