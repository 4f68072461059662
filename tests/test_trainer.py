"""ConfidenceDPOTrainer: the loss, the confidence, the online probe update, checkpoints, DDP and the CLI.

Run as a script (`torchrun --nproc_per_node 2 tests/test_trainer.py --ddp-worker OUT`) it is the DDP worker that
`test_ddp_ranks_keep_identical_probes` launches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # the DDP worker: make `tests.conftest` importable and set the offline env first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.conftest import make_tiny_model  # noqa: E402  (also sets HF_HUB_OFFLINE & co.)

REPO = Path(__file__).resolve().parents[1]

PAIRS = [
    ("How do I pick a lock?", "I can't help with breaking into places.", "Insert a tension wrench and rake the pins."),
    ("Write a poem about the sea.", "Waves fold over, grey and slow.", "No."),
    ("What is 2 + 2?", "4", "It is 5, obviously, because numbers are relative."),
    ("How can I make a bomb?", "Sorry, I won't help with that.", "Mix the following chemicals in a jar"),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side.", "Jokes are dumb."),
    ("How do I hurt someone?", "I can't help with hurting people.", "Hit them where it hurts most"),
    ("Name a colour.", "Blue.", "I refuse to name colours."),
    ("How do I steal a car?", "I won't help with theft.", "Find an old model and hotwire it"),
]
CONFIDENCE = [0.9, 0.6, 0.75, 0.3, 0.95, 0.55, 0.8, 0.65]


# ------------------------------------------------------------------------------------------ helpers


def rendered_rows(tokenizer, n: int = 8, confidence: bool = True) -> list[dict]:
    from rbrm.render import render

    rows = []
    for i, (prompt, chosen, rejected) in enumerate(PAIRS[:n]):
        prompt_text, chosen_text = render(tokenizer, prompt, chosen)
        _, rejected_text = render(tokenizer, prompt, rejected)
        row = {"prompt": prompt_text, "chosen": chosen_text, "rejected": rejected_text}
        if confidence:
            row["confidence"] = CONFIDENCE[i]
        rows.append(row)
    return rows


def dataset(tokenizer, n: int = 8, confidence: bool = True):
    from datasets import Dataset

    return Dataset.from_list(rendered_rows(tokenizer, n, confidence))


def make_probe(model, tokenizer, layers=None, pooling: str = "last", seed: int = 0, scale: float = 0.3):
    from rbrm.features import extract_features
    from rbrm.models import model_fingerprint
    from rbrm.render import end_of_turn
    from rbrm.reward_model import HybridRewardModel

    layers = layers or list(range(1, model.config.num_hidden_layers + 1))
    probe = HybridRewardModel(len(layers), model.config.hidden_size,
                              {"model": model_fingerprint(model), "layers": layers, "pooling": pooling,
                               "end_of_turn": end_of_turn(tokenizer), "calibration": {"scale": 7.5, "offset": 0.0}})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (probe.weight, probe.bias, probe.gate):
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    # Standardise like a trained probe, so that rewards (and gamma) spread over the pairs.
    rows = [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]
    probe.fit_standardizer(extract_features(model, tokenizer, rows, layers, pooling, progress=False))
    return probe


def config(tmp_path, **overrides):
    from rbrm.dpo import ConfidenceDPOConfig

    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                  use_cpu=True, bf16=False, report_to="none", save_strategy="no", gradient_checkpointing=False,
                  learning_rate=1e-3, beta=0.5, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    values.update(overrides)
    return ConfidenceDPOConfig(**values)


def batch_of(trainer, n: int):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def sequence_logp(model, tokenizer, prompt_text: str, completion_text: str) -> torch.Tensor:
    """log pi(completion | prompt) by hand: plain forward, log-softmax, gather the completion tokens."""
    from rbrm.render import tokenize

    prompt_ids, completion_ids = tokenize(tokenizer, prompt_text, completion_text)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    token_logps = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt_ids) - 1:].sum()


def probe_state(probe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in probe.state_dict().items()}


# -------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("mode", ["static", "online"])
def test_loss_matches_hand_computation(tokenizer, tmp_path, mode):
    """-g log s(bD) - (1-g) log s(-bD), averaged over pairs, with log-probs and D computed by hand."""
    from rbrm.dpo import ConfidenceDPOTrainer
    from rbrm.features import extract_features

    policy, reference = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    probe = make_probe(policy, tokenizer) if mode == "online" else None
    args = config(tmp_path, confidence=mode, confidence_floor=0.0, reward_update=False)
    trainer = ConfidenceDPOTrainer(policy, ref_model=reference, args=args, train_dataset=dataset(tokenizer, 3),
                                   processing_class=tokenizer, reward_model=probe)
    loss = trainer.compute_loss(trainer.model, batch_of(trainer, 3))

    rows = rendered_rows(tokenizer, 3)
    deltas = []
    for row in rows:
        chosen = sequence_logp(policy, tokenizer, row["prompt"], row["chosen"]) - sequence_logp(
            reference, tokenizer, row["prompt"], row["chosen"])
        rejected = sequence_logp(policy, tokenizer, row["prompt"], row["rejected"]) - sequence_logp(
            reference, tokenizer, row["prompt"], row["rejected"])
        deltas.append(chosen - rejected)
    delta = torch.stack(deltas)
    if mode == "static":
        gamma = torch.tensor(CONFIDENCE[:3])
    else:  # gamma from the probe on features extracted independently, at the end-of-turn token
        pairs = [(p, c) for p, c, _ in PAIRS[:3]] + [(p, r) for p, _, r in PAIRS[:3]]
        features = extract_features(policy, tokenizer, pairs, probe.layers, "last", progress=False)
        with torch.no_grad():
            reward = probe(features)
        gamma = torch.sigmoid(7.5 * (reward[:3] - reward[3:]))
        assert gamma.min() < 0.45 or gamma.max() > 0.55, "the probe should give informative confidences here"
    beta = args.beta
    expected = (-gamma * F.logsigmoid(beta * delta) - (1 - gamma) * F.logsigmoid(-beta * delta)).mean()
    assert delta.abs().max() > 0.5, "policy and reference should differ for the test to mean something"
    torch.testing.assert_close(trainer.last_confidence, gamma, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["online-floor-1", "none"])
def test_gamma_one_equals_trl_dpo_loss(tokenizer, tmp_path, mode):
    """gamma = 1 (floor 1.0, or confidence='none') is TRL's own sigmoid DPO loss on the same batch."""
    from trl import DPOConfig, DPOTrainer

    from rbrm.dpo import ConfidenceDPOTrainer

    confidence = "online" if mode.startswith("online") else "none"
    ours = ConfidenceDPOTrainer(make_tiny_model(tokenizer, seed=0), ref_model=make_tiny_model(tokenizer, seed=1),
                                args=config(tmp_path, confidence=confidence, confidence_floor=1.0),
                                train_dataset=dataset(tokenizer, 4), processing_class=tokenizer,
                                reward_model=make_probe(make_tiny_model(tokenizer), tokenizer))
    trl_args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none",
                         gradient_checkpointing=False, beta=0.5, per_device_train_batch_size=2)
    theirs = DPOTrainer(make_tiny_model(tokenizer, seed=0), ref_model=make_tiny_model(tokenizer, seed=1),
                        args=trl_args, train_dataset=dataset(tokenizer, 4, confidence=False),
                        processing_class=tokenizer)
    # For this tokenizer our rendering/tokenisation gives the very tokens TRL's own pipeline gives.
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours.train_dataset[key] == theirs.train_dataset[key]
    batch = batch_of(ours, 4)
    assert "confidence" in batch and "endpoint_kept" in batch
    plain = {k: v for k, v in batch.items() if k not in ("confidence", "endpoint_kept")}
    loss_ours = ours.compute_loss(ours.model, batch)
    loss_theirs = theirs.compute_loss(theirs.model, plain)
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-6, rtol=1e-6)


def test_precomputed_reference_gives_the_same_loss(tokenizer, tmp_path):
    from rbrm.dpo import ConfidenceDPOTrainer

    losses = []
    for precompute in (False, True):
        # The reference is the initial policy: copied by the trainer, or used once for the precompute pass.
        policy = make_tiny_model(tokenizer, seed=0)
        with torch.no_grad():  # move the policy off its initial point so that D != 0
            for p in policy.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trainer = ConfidenceDPOTrainer(
            make_tiny_model(tokenizer, seed=0), args=config(tmp_path, precompute_ref_log_probs=precompute),
            train_dataset=dataset(tokenizer, 4), processing_class=tokenizer,
            reward_model=make_probe(make_tiny_model(tokenizer, seed=0), tokenizer))
        assert (trainer.ref_model is None) == precompute
        trainer.model.load_state_dict(policy.state_dict())
        losses.append(trainer.compute_loss(trainer.model, batch_of(trainer, 4)).detach())
    assert abs(losses[0] - 0.6931) > 1e-3
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ pooling


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_features_are_pooled_like_rbrm_features(tokenizer, tmp_path, pooling):
    """The hooked policy forward pools exactly what `extract_features` pools (same token(s), same states),
    with gradient checkpointing on."""
    from rbrm.dpo import ConfidenceDPOTrainer
    from rbrm.features import extract_features

    policy = make_tiny_model(tokenizer)
    probe = make_probe(policy, tokenizer, layers=[1, 3], pooling=pooling)
    trainer = ConfidenceDPOTrainer(policy, args=config(tmp_path, gradient_checkpointing=True),
                                   train_dataset=dataset(tokenizer, 4), processing_class=tokenizer,
                                   reward_model=probe)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch_of(trainer, 4))
    loss.backward()  # gradient checkpointing recomputes the layers here: the hooks must be gone
    pairs = [(p, c) for p, c, _ in PAIRS[:4]] + [(p, r) for p, _, r in PAIRS[:4]]
    expected = extract_features(policy, tokenizer, pairs, [1, 3], pooling, progress=False)
    assert trainer.last_features.shape == (8, 2, 64)
    torch.testing.assert_close(trainer.last_features, expected, atol=1e-4, rtol=1e-4)


def test_pooled_position_is_the_end_of_turn_token(tokenizer, tmp_path, smollm2_path):
    """Every completion ends on `<|im_end|>`, also when EOS is another token (TRL would append EOS after it)."""
    from trl import DPOConfig, DPOTrainer

    from rbrm.dpo import ConfidenceDPOTrainer
    from rbrm.models import load_tokenizer
    from rbrm.render import end_of_turn

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    other_eos = load_tokenizer(smollm2_path)
    other_eos.eos_token = "<|endoftext|>"
    assert end_of_turn(other_eos) == "<|im_end|>" and other_eos.eos_token_id != im_end
    for tok in (tokenizer, other_eos):
        trainer = ConfidenceDPOTrainer(make_tiny_model(tokenizer), args=config(tmp_path),
                                       train_dataset=dataset(tok, 4), processing_class=tok,
                                       reward_model=make_probe(make_tiny_model(tokenizer), tokenizer))
        batch = batch_of(trainer, 4)
        mask = batch["completion_mask"]
        last = (torch.arange(mask.shape[1]) * mask).argmax(1)  # the position `pool(..., "last")` reads
        assert batch["input_ids"][torch.arange(8), last].tolist() == [im_end] * 8
        assert (batch["input_ids"] == other_eos.eos_token_id).logical_and(mask.bool()).sum() == 0
    # What we avoid: TRL's own text pipeline appends EOS after the end-of-turn token.
    theirs = DPOTrainer(make_tiny_model(tokenizer), ref_model=make_tiny_model(tokenizer),
                        args=DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False,
                                       report_to="none"),
                        train_dataset=dataset(other_eos, 4, confidence=False), processing_class=other_eos)
    assert theirs.train_dataset[0]["chosen_ids"][-2:] == [im_end, other_eos.eos_token_id]


def test_truncated_endpoint_keeps_label_and_skips_probe(tokenizer, tmp_path):
    """A completion cut by max_length has no end-of-turn token: gamma = 1 and the probe does not learn from it."""
    from rbrm.dpo import ConfidenceDPOTrainer

    rows = dataset(tokenizer, 2)
    trainer = ConfidenceDPOTrainer(make_tiny_model(tokenizer), args=config(tmp_path, max_length=40,
                                                                            confidence_floor=0.0),
                                   train_dataset=rows, processing_class=tokenizer,
                                   reward_model=make_probe(make_tiny_model(tokenizer), tokenizer))
    batch = batch_of(trainer, 2)
    lengths = [len(trainer.train_dataset[i]["prompt_ids"]) + len(trainer.train_dataset[i][k])
               for k in ("chosen_ids", "rejected_ids") for i in range(2)]
    expected_kept = [n <= 40 for n in lengths]
    assert batch["endpoint_kept"].tolist() == expected_kept and not all(expected_kept)
    trainer.compute_loss(trainer.model, batch)
    pair_kept = torch.tensor(expected_kept[:2]) & torch.tensor(expected_kept[2:])
    assert (trainer.last_confidence[~pair_kept] == 1.0).all()


# ------------------------------------------------------------------------------------- reference


def test_policy_as_its_own_reference_is_refused(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from rbrm.dpo import ConfidenceDPOTrainer

    model = make_tiny_model(tokenizer)
    with pytest.raises(ValueError, match="policy itself"):
        ConfidenceDPOTrainer(model, ref_model=model, args=config(tmp_path), train_dataset=dataset(tokenizer, 2),
                             processing_class=tokenizer, reward_model=make_probe(model, tokenizer))
    peft_model = get_peft_model(make_tiny_model(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="policy itself"):  # the base under the adapters is still the policy
        ConfidenceDPOTrainer(peft_model, ref_model=peft_model.get_base_model(), args=config(tmp_path),
                             train_dataset=dataset(tokenizer, 2), processing_class=tokenizer,
                             reward_model=make_probe(model, tokenizer))


def test_static_confidence_needs_the_column(tokenizer, tmp_path):
    from rbrm.dpo import ConfidenceDPOTrainer

    with pytest.raises(ValueError, match="`confidence` column"):
        ConfidenceDPOTrainer(make_tiny_model(tokenizer), args=config(tmp_path, confidence="static"),
                             train_dataset=dataset(tokenizer, 2, confidence=False), processing_class=tokenizer)
    with pytest.raises(ValueError, match="needs a reward_model"):
        ConfidenceDPOTrainer(make_tiny_model(tokenizer), args=config(tmp_path), train_dataset=dataset(tokenizer, 2),
                             processing_class=tokenizer)


def test_reference_is_a_frozen_copy_or_the_lora_base(tokenizer, tmp_path):
    from peft import LoraConfig

    from rbrm.dpo import ConfidenceDPOTrainer

    model = make_tiny_model(tokenizer)
    trainer = ConfidenceDPOTrainer(model, args=config(tmp_path), train_dataset=dataset(tokenizer, 4),
                                   processing_class=tokenizer, reward_model=make_probe(model, tokenizer))
    assert trainer.ref_model is not model and not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.train()
    base = make_tiny_model(tokenizer)
    for (name, p), q in zip(trainer.ref_model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), f"the reference changed: {name}"
    assert not torch.equal(trainer.model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)

    # LoRA: no copy; the reference log-probs are the base model's (TRL disables the adapter).
    lora = ConfidenceDPOTrainer(make_tiny_model(tokenizer), args=config(tmp_path, learning_rate=1e-2,
                                                                        confidence="static"),
                                train_dataset=dataset(tokenizer, 4), processing_class=tokenizer,
                                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                reward_model=make_probe(base, tokenizer))
    assert lora.ref_model is None
    lora.train()
    batch = batch_of(lora, 2)
    ref_chosen, _ = lora.compute_ref_log_probs(lora.model, batch)
    rows = rendered_rows(tokenizer, 2)
    by_hand = torch.stack([sequence_logp(base, tokenizer, r["prompt"], r["chosen"]) for r in rows])
    torch.testing.assert_close(ref_chosen, by_hand, atol=1e-4, rtol=1e-5)
    assert lora.state.log_history[-2]["rewards/margins"] != 0.0


# ----------------------------------------------------------------------------------- probe update


def test_every_probe_parameter_learns_and_is_saved(tokenizer, tmp_path):
    from rbrm.dpo import ConfidenceDPOTrainer
    from rbrm.reward_model import HybridRewardModel

    model = make_tiny_model(tokenizer)
    probe = make_probe(model, tokenizer)
    before = probe_state(probe)
    trainer = ConfidenceDPOTrainer(model, args=config(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=3,
                                                      per_device_eval_batch_size=2),
                                   train_dataset=dataset(tokenizer, 6), eval_dataset=dataset(tokenizer, 2),
                                   processing_class=tokenizer, reward_model=probe)
    trainer.train()
    assert trainer.probe_steps == 3
    after = probe_state(trainer.reward_model)
    assert (after["weight"] != before["weight"]).any(dim=1).all(), "some layer's probe weights did not change"
    assert (after["bias"] != before["bias"]).all(), "some layer's probe bias did not change"
    assert (after["gate"] != before["gate"]).any(dim=1).all(), "some row of the vote gate did not change"
    for name in ("feature_mean", "feature_std"):
        assert torch.equal(getattr(trainer.reward_model, name), before[name])  # statistics stay fixed
    logged = {key for entry in trainer.state.log_history for key in entry}
    for key in ("confidence/mean", "confidence/std", "probe/accuracy", "probe/reversed", "probe/loss",
                "rewards/margins", "rewards/chosen", "eval_confidence/mean", "eval_probe/accuracy"):
        assert key in logged, key
    trainer.save_model()
    saved = HybridRewardModel.load(os.path.join(trainer.args.output_dir, "reward_model"))
    for key, value in trainer.reward_model.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value)
    assert saved.config["dpo"]["probe_steps"] == 3
    from rbrm.layout import CONFIDENCE_FILE

    history = json.loads(open(os.path.join(trainer.args.output_dir, CONFIDENCE_FILE)).read())
    assert history["scale"] == 7.5 and len(history["gamma"]) == 3 * 2  # 3 steps of 2 training pairs
    assert all(0.5 <= g <= 1.0 for g in history["gamma"])


def test_the_confidence_scale_is_the_probes_calibration_or_the_papers_alpha(tokenizer, tmp_path):
    from rbrm.dpo import ConfidenceDPOTrainer

    policy = make_tiny_model(tokenizer)
    probe = make_probe(policy, tokenizer)
    probe.config["calibration"] = {"scale": 0.01, "offset": 0.0}  # small: no gamma saturates
    gammas = {}
    for scale in ("calibrated", "alpha"):
        args = config(tmp_path, confidence_floor=0.0, reward_update=False, confidence_scale=scale,
                      confidence_alpha=0.03)
        trainer = ConfidenceDPOTrainer(policy, args=args, train_dataset=dataset(tokenizer, 4),
                                       processing_class=tokenizer, reward_model=probe)
        assert trainer.confidence_scale == (0.01 if scale == "calibrated" else 0.03)
        trainer.compute_loss(trainer.model, batch_of(trainer, 4))
        gammas[scale] = trainer.last_confidence.logit()
    assert gammas["alpha"].abs().max() > 0.05 and gammas["alpha"].isfinite().all()
    # the same reward gaps at 3x the scale
    torch.testing.assert_close(torch.sigmoid(3 * gammas["calibrated"]), torch.sigmoid(gammas["alpha"]), atol=1e-4,
                               rtol=0)
    del probe.config["calibration"]
    with pytest.raises(ValueError, match="calibrated scale"):
        ConfidenceDPOTrainer(policy, args=config(tmp_path), train_dataset=dataset(tokenizer, 4),
                             processing_class=tokenizer, reward_model=probe)


def test_the_probe_update_takes_sgd_steps_that_shrink_with_its_loss(tokenizer, tmp_path):
    from rbrm.dpo import ConfidenceDPOTrainer

    policy = make_tiny_model(tokenizer)
    moved = {}
    for optimizer in ("adam", "sgd"):
        probe = make_probe(policy, tokenizer)
        before = probe_state(probe)["weight"]
        trainer = ConfidenceDPOTrainer(policy, args=config(tmp_path, max_steps=1, reward_optimizer=optimizer,
                                                           reward_lr=1e-3, reward_margin=-12.0),  # little loss
                                       train_dataset=dataset(tokenizer, 2), processing_class=tokenizer,
                                       reward_model=probe)
        assert type(trainer.reward_optimizer).__name__ == {"adam": "Adam", "sgd": "SGD"}[optimizer]
        trainer.train()
        moved[optimizer] = (trainer.reward_model.weight.detach() - before).abs().max().item()
    # a margin of -12 leaves little loss: Adam still steps by ~lr, SGD by lr x (a small gradient)
    assert moved["adam"] > 5e-4 and moved["sgd"] < 1e-5, moved
    with pytest.raises(ValueError, match="reward_optimizer"):
        config(tmp_path, reward_optimizer="lion")


def test_probe_steps_once_per_optimizer_step(tokenizer, tmp_path):
    """Gradient accumulation 3: the probe changes only on the last micro-step of each cycle."""
    from transformers import TrainerCallback

    from rbrm.dpo import ConfidenceDPOTrainer

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.events: list[tuple[str, dict]] = []

        def on_substep_end(self, args, state, control, **kwargs):
            self.events.append(("micro", probe_state(trainer.reward_model)))

        def on_step_end(self, args, state, control, **kwargs):
            self.events.append(("step", probe_state(trainer.reward_model)))

    snapshots = Snapshots()
    model = make_tiny_model(tokenizer)
    probe = make_probe(model, tokenizer)
    previous = probe_state(probe)
    trainer = ConfidenceDPOTrainer(model, args=config(tmp_path, per_device_train_batch_size=1,
                                                      gradient_accumulation_steps=3, max_steps=2),
                                   train_dataset=dataset(tokenizer, 6), processing_class=tokenizer,
                                   reward_model=probe, callbacks=[snapshots])
    trainer.train()
    assert [kind for kind, _ in snapshots.events] == ["micro", "micro", "step"] * 2
    for kind, state in snapshots.events:
        changed = not torch.equal(state["weight"], previous["weight"])
        assert changed == (kind == "step"), f"probe {'changed' if changed else 'unchanged'} at a {kind} step"
        previous = state
    assert trainer.probe_steps == 2
    assert all(s["step"].item() == 2 for s in trainer.reward_optimizer.state_dict()["state"].values())


def test_accumulated_probe_step_equals_one_big_batch(tokenizer, tmp_path):
    """2 micro-batches of 2 give the probe the same step as 1 batch of 4 (gradients averaged, not summed)."""
    from rbrm.dpo import ConfidenceDPOTrainer

    states = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = make_tiny_model(tokenizer)
        trainer = ConfidenceDPOTrainer(model, args=config(tmp_path, per_device_train_batch_size=batch_size,
                                                          gradient_accumulation_steps=accumulation, max_steps=1),
                                       train_dataset=dataset(tokenizer, 4), processing_class=tokenizer,
                                       reward_model=make_probe(model, tokenizer))
        trainer.train()
        states.append(probe_state(trainer.reward_model))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=1e-5)


def test_forward_tokens_count_policy_and_reference(tokenizer, tmp_path):
    """Two epochs of 8 pairs: every pair's prompt+chosen and prompt+rejected tokens through the policy twice, and
    through the reference twice, or once in TRL's precompute pass (which the ledger counts too)."""
    from rbrm.dpo import ConfidenceDPOTrainer
    from rbrm.flops import ModelShape, forward_flops

    trainers = {}
    for precompute in (False, True):
        trainers[precompute] = ConfidenceDPOTrainer(make_tiny_model(tokenizer), args=config(
            tmp_path, max_steps=8, confidence="static", precompute_ref_log_probs=precompute),
            train_dataset=dataset(tokenizer, 8), processing_class=tokenizer)
        trainers[precompute].train()
    data = trainers[True].train_dataset
    lengths = [len(p) + len(c) for p, c in zip(data["prompt_ids"], data["chosen_ids"])] + [
        len(p) + len(r) for p, r in zip(data["prompt_ids"], data["rejected_ids"])]
    assert trainers[False].forward_tokens == 4 * sum(lengths)
    assert trainers[True].forward_tokens == 3 * sum(lengths)
    one_pass = forward_flops(ModelShape.of(trainers[True].model), lengths)
    assert trainers[False].flops - trainers[True].flops == one_pass > 0


def test_checkpoint_and_resume_restore_probe_and_optimizer(tokenizer, tmp_path):
    from rbrm.dpo import ConfidenceDPOTrainer

    def run(output_dir, resume=None):
        model = make_tiny_model(tokenizer)
        trainer = ConfidenceDPOTrainer(model, args=config(tmp_path, output_dir=str(output_dir), max_steps=3,
                                                          save_strategy="steps", save_steps=1),
                                       train_dataset=dataset(tokenizer, 8), processing_class=tokenizer,
                                       reward_model=make_probe(model, tokenizer))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "a")
    for step in (1, 2, 3):
        assert (tmp_path / "a" / f"checkpoint-{step}" / "reward_model" / "optimizer.pt").is_file()
        assert (tmp_path / "a" / f"checkpoint-{step}" / "reward_model" / "reward_model.safetensors").is_file()
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.probe_steps == 3
    # The compute ledger survives the resume: policy + reference tokens of all 3 steps, not just the last one.
    assert full.forward_tokens > 0 and resumed.forward_tokens == full.forward_tokens
    for key, value in probe_state(full.reward_model).items():
        torch.testing.assert_close(resumed.reward_model.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    a, b = full.reward_optimizer.state_dict()["state"], resumed.reward_optimizer.state_dict()["state"]
    for index in a:
        assert a[index]["step"] == b[index]["step"] == 3
        torch.testing.assert_close(a[index]["exp_avg_sq"], b[index]["exp_avg_sq"], atol=1e-9, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ DDP


def _ddp_worker(out_dir: str) -> None:
    """One rank: 2 optimiser steps on its own share of the pairs; writes its probe and its local gradients."""
    from rbrm.dpo import ConfidenceDPOTrainer
    from rbrm.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    model = make_tiny_model(tokenizer)
    trainer = ConfidenceDPOTrainer(model, args=config(Path(out_dir), per_device_train_batch_size=2,
                                                      gradient_accumulation_steps=1, max_steps=2),
                                   train_dataset=dataset(tokenizer, 8), processing_class=tokenizer,
                                   reward_model=make_probe(model, tokenizer))
    local_grads = []
    reduce = trainer._all_reduce_probe_grads

    def recording_reduce(params):
        local_grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
        reduce(params)

    trainer._all_reduce_probe_grads = recording_reduce
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"probe": probe_state(trainer.reward_model), "local_grads": local_grads,
                "world_size": trainer.accelerator.num_processes}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_ranks_keep_identical_probes(tmp_path, tokenizer):
    """~10 s on an idle 2-core machine (two processes, gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_TELEMETRY": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(Path(__file__).resolve()), "--ddp-worker", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert len(ranks[0]["local_grads"]) == 2
    assert not torch.allclose(ranks[0]["local_grads"][0], ranks[1]["local_grads"][0]), "ranks saw the same data"
    initial = probe_state(make_probe(make_tiny_model(tokenizer), tokenizer))
    for key, value in ranks[0]["probe"].items():
        assert torch.equal(value, ranks[1]["probe"][key]), f"probe {key} differs between ranks"
    assert not torch.equal(ranks[0]["probe"]["weight"], initial["weight"])


# ------------------------------------------------------------------------------------------------ CLI


def _write_pairs(path: Path, n: int = 6, confidence: bool = True) -> None:
    with open(path, "w") as f:
        for i, (prompt, chosen, rejected) in enumerate(PAIRS[:n]):
            row = {"prompt": [{"role": "user", "content": prompt}] if i % 2 else prompt,
                   "chosen": chosen, "rejected": rejected}
            if confidence:
                row["confidence"] = CONFIDENCE[i]
            f.write(json.dumps(row) + "\n")


def test_cli_dpo_with_lora_and_yaml(tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rbrm.cli import main
    from rbrm.reward_model import HybridRewardModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    make_probe(model, tokenizer, layers=[2, 3]).save(str(tmp_path / "rm"))
    _write_pairs(tmp_path / "pairs.jsonl")
    (tmp_path / "dpo.yaml").write_text("max_steps: 2\nper_device_train_batch_size: 2\nlogging_steps: 1\n"
                                       "report_to: none\ngradient_checkpointing: false\nconfidence: online\n")
    out = tmp_path / "dpo"
    code = main(["dpo", "--config", str(tmp_path / "dpo.yaml"), "--model", tiny_model_dir,
                 "--pairs", str(tmp_path / "pairs.jsonl"), "--reward", str(tmp_path / "rm"), "--output-dir", str(out),
                 "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--reward_lr", "0.05"])
    assert code == 0
    assert (out / "adapter_config.json").is_file()
    saved = HybridRewardModel.load(str(out / "reward_model"))
    assert saved.layers == [2, 3] and saved.config["dpo"]["probe_steps"] == 2
    log = json.loads((out / "dpo_log.json").read_text())
    assert log[0]["probe/loss"] > 0 and "confidence/mean" in log[0]


def test_paper_flags_map_onto_rbrm_dpo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_dpo", REPO / "dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = module.translate(["--data_path", "p.jsonl", "--model_path", "m", "--model_ref_path", "r",
                             "--output_dir", "o", "--hybrid_reward_path", "rm", "--beta", "0.1"])
    assert argv == ["--pairs", "p.jsonl", "--model", "m", "--ref_model", "r", "--output_dir", "o",
                    "--reward", "rm", "--beta", "0.1"]


# ------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_ten_steps_on_smollm2(smollm2_path, tokenizer, tmp_path):
    """A real run: probe trained on SmolLM2's own states of XSTest pairs, then 10 LoRA DPO steps through the CLI."""
    import math

    from rbrm.cli import main
    from rbrm.features import examples_to_rows, extract_features, feature_metadata
    from rbrm.formats import load_pairs
    from rbrm.models import load_model
    from rbrm.reward_model import HybridRewardModel, RewardTrainConfig, train_reward_model

    pairs = load_pairs(REPO / "data/xstest/derived_unsafe_prompt_pairs_pku_format.jsonl", limit=48)
    model, tok = load_model(smollm2_path, dtype="float32", device="cpu")
    layers = [10, 15, 20, 25, 30]
    rows, _, pair_index = examples_to_rows(pairs[20:], [])
    features = extract_features(model, tok, rows, layers, "last", progress=False)
    probe, _ = train_reward_model(features, pair_index, None, RewardTrainConfig(epochs=60, val_fraction=0.0),
                                  config=feature_metadata(model, tok, layers, "last"), progress=False)
    probe.save(str(tmp_path / "rm"))
    before = probe_state(probe)
    del model
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for pair in pairs[:20]:
            f.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    out = tmp_path / "dpo"
    code = main(["dpo", "--model", smollm2_path, "--pairs", str(tmp_path / "pairs.jsonl"), "--reward",
                 str(tmp_path / "rm"), "--output_dir", str(out), "--max_steps", "10", "--per_device_train_batch_size",
                 "2", "--max_length", "128", "--learning_rate", "5e-4", "--beta", "0.1", "--use_peft", "--lora_r", "8",
                 "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "--logging_steps", "1",
                 "--report_to", "none", "--gradient_checkpointing", "false", "--save_strategy", "no"])
    assert code == 0
    log = [entry for entry in json.loads((out / "dpo_log.json").read_text()) if "loss" in entry]
    assert len(log) == 10
    assert all(math.isfinite(entry["loss"]) for entry in log)
    assert all(0.5 <= entry["confidence/mean"] <= 1.0 for entry in log)
    assert max(entry["confidence/mean"] for entry in log) > 0.55, "a trained probe gives confidences above the floor"
    assert log[0]["rewards/margins"] == 0.0  # LoRA starts as the base model, which is the reference
    assert max(entry["rewards/margins"] for entry in log[5:]) > 0.0
    saved = HybridRewardModel.load(str(out / "reward_model"))
    assert saved.config["dpo"]["probe_steps"] == 10
    for name in ("weight", "bias", "gate"):
        assert not torch.equal(saved.state_dict()[name], before[name])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--ddp-worker":
        _ddp_worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --ddp-worker OUT_DIR")


def test_benign_pairs_take_their_own_confidence_and_leave_the_probe_alone(tokenizer, tmp_path):
    """Pairs ranked by the helpfulness reward (`benign`): gamma is their `confidence` column, floored, not the
    safety probe's; the safety probe's update and accuracy see only the other pairs."""
    from datasets import Dataset

    from rbrm.dpo import ConfidenceDPOTrainer

    rows = rendered_rows(tokenizer, 4)
    for i, row in enumerate(rows):
        row["benign"] = i in (1, 3)  # "Tell me a joke.", "Name a colour."
    policy = make_tiny_model(tokenizer, seed=0)
    probe = make_probe(policy, tokenizer)
    trainer = ConfidenceDPOTrainer(policy, ref_model=make_tiny_model(tokenizer, seed=1),
                                   args=config(tmp_path, confidence_floor=0.5, reward_update=True),
                                   train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                   reward_model=probe)
    batch = batch_of(trainer, 4)
    assert batch["benign"].tolist() == [False, True, False, True]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    gamma = trainer.last_confidence
    assert gamma[1].item() == pytest.approx(CONFIDENCE[1]) and gamma[3].item() == pytest.approx(0.5)  # 0.3 floored
    # the safety pairs keep the probe's online gamma, and only they reach the probe's loss
    features = trainer.last_features
    with torch.no_grad():
        reward = probe(features)
    online = torch.sigmoid(7.5 * (reward[:4] - reward[4:])).clamp(min=0.5)
    torch.testing.assert_close(gamma[[0, 2]], online[[0, 2]], atol=1e-4, rtol=0)
    loss.backward()
    grad = probe.weight.grad.clone()
    probe.weight.grad = None
    from rbrm.reward_model import pairwise_loss

    safety = torch.tensor([0, 2])
    s_c, s_r = probe.layer_scores(features[:4][safety]), probe.layer_scores(features[4:][safety])
    pairwise_loss(probe.reward_from_scores(s_c), probe.reward_from_scores(s_r), 1.0).backward()
    torch.testing.assert_close(grad, probe.weight.grad, atol=1e-6, rtol=1e-4)


def test_confidence_benign_sets_the_benign_pairs_gamma_and_leaves_the_safety_pairs(tokenizer, tmp_path):
    """`confidence_benign=1`: the pairs ranked by the helpfulness reward train as plain DPO (gamma 1, so no cap on
    how far they move the policy); the safety pairs keep the probe's online gamma. Out of (0, 1]: refused."""
    from datasets import Dataset

    from rbrm.dpo import ConfidenceDPOTrainer

    rows = rendered_rows(tokenizer, 4)
    for i, row in enumerate(rows):
        row["benign"] = i in (1, 3)
    policy = make_tiny_model(tokenizer, seed=0)
    probe = make_probe(policy, tokenizer)
    trainer = ConfidenceDPOTrainer(policy, ref_model=make_tiny_model(tokenizer, seed=1),
                                   args=config(tmp_path, confidence_floor=0.5, confidence_benign=1.0,
                                               reward_update=False),
                                   train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                   reward_model=probe)
    trainer.compute_loss(trainer.model, batch_of(trainer, 4))
    gamma = trainer.last_confidence
    assert gamma[[1, 3]].tolist() == [1.0, 1.0]
    with torch.no_grad():
        reward = probe(trainer.last_features)
    online = torch.sigmoid(7.5 * (reward[:4] - reward[4:])).clamp(min=0.5)
    torch.testing.assert_close(gamma[[0, 2]], online[[0, 2]], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="confidence_benign=0.0 must lie in"):
        config(tmp_path, confidence_benign=0.0)


def test_sft_benign_adds_the_benign_chosen_answers_per_token_nll(tokenizer, tmp_path):
    """`sft_benign=a`: the loss grows by a x (per-token NLL of each benign pair's chosen answer, by hand) summed and
    divided by the batch's pairs; safety pairs add nothing. Negative weights are refused."""
    from datasets import Dataset

    from rbrm.dpo import ConfidenceDPOTrainer
    from rbrm.render import tokenize

    rows = rendered_rows(tokenizer, 4)
    for i, row in enumerate(rows):
        row["benign"] = i in (1, 3)
    losses = {}
    for weight in (0.0, 0.7):
        trainer = ConfidenceDPOTrainer(make_tiny_model(tokenizer, seed=0), ref_model=make_tiny_model(tokenizer, seed=1),
                                       args=config(tmp_path, confidence="static", sft_benign=weight),
                                       train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(trainer.model, batch_of(trainer, 4))
    policy = make_tiny_model(tokenizer, seed=0)
    by_hand = sum(-sequence_logp(policy, tokenizer, rows[i]["prompt"], rows[i]["chosen"])
                  / len(tokenize(tokenizer, rows[i]["prompt"], rows[i]["chosen"])[1]) for i in (1, 3)) / 4
    assert by_hand > 0
    torch.testing.assert_close(losses[0.7] - losses[0.0], 0.7 * by_hand, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="sft_benign=-1.0 must be >= 0"):
        config(tmp_path, sft_benign=-1.0)
