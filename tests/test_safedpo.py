"""SafeDPO (rbrm.dpo.safedpo and `ConfidenceDPOConfig.safety_margin`): the safety-aware transformation, the loss
-log sigmoid(beta D - m Delta) against a hand computation, and errors that name the file, line and field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rbrm.dpo import (
    ConfidenceDPOConfig,
    ConfidenceDPOTrainer,
    load_safedpo_rows,
    pairs_dataset,
    preference_dataset,
    safedpo_dataset,
    safedpo_rows,
    safedpo_transform,
)
from rbrm.errors import ConfigError, DataError
from rbrm.formats import PreferencePair, SafetyLabelledPair
from rbrm.render import render
from tests.conftest import make_tiny_model
from tests.test_trainer import PAIRS, batch_of, config, sequence_logp

REPO = Path(__file__).resolve().parents[1]
XSTEST = REPO / "data" / "xstest" / "derived_unsafe_prompt_pairs_pku_format.jsonl"
HH = REPO / "data" / "hh_rlhf_harmless_test" / "derived_pku_format.jsonl"


def pku_row(prompt: str, r0: str, r1: str, better: int, safe0, safe1) -> dict:
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "is_response_0_safe": safe0,
            "is_response_1_safe": safe1, "better_response_id": better, "safer_response_id": 0 if safe0 else 1}


# One row per case of T, labels as PKU-SafeRLHF writes them (bools) and as a CSV export would (strings).
FIXTURE = [
    pku_row("Q-keep", "safe and helpful", "unsafe", 0, True, False),            # h_w=0, h_l=1: kept, m=1
    pku_row("Q-swap", "unsafe but helpful", "safe refusal", 0, False, True),   # h_w=1, h_l=0: swapped, m=1
    pku_row("Q-both-safe", "safe, less helpful", "safe, more helpful", 1, "true", "true"),  # kept, m=0
    pku_row("Q-both-unsafe", "unsafe a", "unsafe b", 0, False, "false"),       # h_w=h_l=1: dropped
    pku_row("Q-swap-1", "safe refusal", "unsafe but helpful", 1, "True", "no"),  # better=1 unsafe: swapped, m=1
]
EXPECTED_ROWS = [
    {"prompt": "Q-keep", "chosen": "safe and helpful", "rejected": "unsafe", "safety_margin": 1.0},
    {"prompt": "Q-swap", "chosen": "safe refusal", "rejected": "unsafe but helpful", "safety_margin": 1.0},
    {"prompt": "Q-both-safe", "chosen": "safe, more helpful", "rejected": "safe, less helpful",
     "safety_margin": 0.0},
    {"prompt": "Q-swap-1", "chosen": "safe refusal", "rejected": "unsafe but helpful", "safety_margin": 1.0},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- the transformation


def test_transformation_keeps_swaps_and_drops_on_a_hand_made_fixture(tmp_path):
    assert load_safedpo_rows(write_jsonl(tmp_path / "pku.jsonl", FIXTURE)) == EXPECTED_ROWS


def test_transformation_of_single_pairs():
    def pair(chosen_safe: bool, rejected_safe: bool) -> SafetyLabelledPair:
        return SafetyLabelledPair("x", "preferred", "other", chosen_safe, rejected_safe)

    assert safedpo_transform(pair(True, False)) == {"prompt": "x", "chosen": "preferred", "rejected": "other",
                                                    "safety_margin": 1.0}
    assert safedpo_transform(pair(True, True)) == {"prompt": "x", "chosen": "preferred", "rejected": "other",
                                                   "safety_margin": 0.0}
    assert safedpo_transform(pair(False, True)) == {"prompt": "x", "chosen": "other", "rejected": "preferred",
                                                    "safety_margin": 1.0}
    assert safedpo_transform(pair(False, False)) is None


def test_only_both_unsafe_pairs_is_an_error_naming_the_source():
    pairs = [SafetyLabelledPair("x", "a", "b", False, False)] * 3
    with pytest.raises(DataError, match="src.jsonl: SafeDPO keeps no pair: all 3"):
        safedpo_rows(pairs, source="src.jsonl")


def test_shipped_xstest_pairs_put_the_safe_answer_first(tmp_path):
    """Every XSTest pair has one safe and one unsafe answer: all are kept, the safe one chosen, with margin 1."""
    raw = [json.loads(line) for line in XSTEST.read_text(encoding="utf-8").splitlines()]
    rows = load_safedpo_rows(XSTEST)
    assert len(rows) == len(raw) == 520
    for row, source in zip(rows, raw, strict=True):
        safe = 0 if source["is_response_0_safe"] else 1
        assert (row["chosen"], row["rejected"]) == (source[f"response_{safe}"], source[f"response_{1 - safe}"])
        assert row["safety_margin"] == 1.0


def test_rows_written_as_trl_jsonl_read_back_with_their_margin(tokenizer, tmp_path):
    """The pipeline trains from a pair file: SafeDPO rows written as TRL jsonl give the dataset `safedpo_dataset`
    builds, `safety_margin` column included."""
    source = write_jsonl(tmp_path / "pku.jsonl", FIXTURE)
    trl_file = write_jsonl(tmp_path / "safedpo.jsonl", load_safedpo_rows(source))
    direct, read_back = safedpo_dataset(source, tokenizer), pairs_dataset(str(trl_file), tokenizer)
    assert direct.column_names == read_back.column_names == ["prompt", "chosen", "rejected", "safety_margin"]
    assert direct.to_list() == read_back.to_list()
    assert direct["safety_margin"] == [1.0, 1.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, field, value, message", [
    (2, "is_response_1_safe", None, "missing"),
    (3, "is_response_0_safe", "maybe", "expected true, false or null"),
    (1, "better_response_id", 2, "expected 0 or 1, got 2"),
    (2, "better_response_id", None, "expected 0 or 1, got None"),
    (3, "response_1", 7, "expected a string"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, line, field, value, message):
    rows = [dict(row) for row in FIXTURE]
    rows[line - 1][field] = value
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_safedpo_rows(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), line, field)
    assert str(info.value).startswith(f"{path}:{line}: field {field!r}: {message}")


def test_files_without_safety_labels_or_pku_rows_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"derived_pku_format.jsonl:1: field 'is_response_0_safe': missing"):
        load_safedpo_rows(HH)  # the shipped HH-RLHF pairs carry no per-response safety labels
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"trl.jsonl:1: expected PKU-SafeRLHF rows"):
        load_safedpo_rows(trl)


def test_a_bad_safety_margin_in_a_pair_file_names_file_line_and_field(tokenizer, tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "safety_margin": 1.0},
            {"prompt": "q", "chosen": "c", "rejected": "d", "safety_margin": "high"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'safety_margin': expected a number >= 0"):
        pairs_dataset(str(path), tokenizer)
    rows[1]["safety_margin"] = None
    with pytest.raises(ValueError, match="some pairs carry a `safety_margin` and some do not"):
        pairs_dataset(str(write_jsonl(path, rows)), tokenizer)


def test_settings_that_cannot_work_are_refused(tokenizer, tmp_path):
    assert ConfidenceDPOConfig.confidence == "online"  # the default, which SafeDPO must turn off
    with pytest.raises(ConfigError, match="set confidence='none', not 'online'"):
        config(tmp_path, safety_margin=1.0)
    with pytest.raises(ConfigError, match="must be a number >= 0"):
        config(tmp_path, confidence="none", safety_margin=-1.0)
    plain = preference_dataset([PreferencePair("p", "a", "b")], tokenizer)
    with pytest.raises(ValueError, match="needs a `safety_margin` column"):
        ConfidenceDPOTrainer(make_tiny_model(tokenizer), args=config(tmp_path, confidence="none", safety_margin=1.0),
                             train_dataset=plain, processing_class=tokenizer)
    with pytest.raises(ValueError, match="not implemented with use_weighting=True"):
        ConfidenceDPOTrainer(make_tiny_model(tokenizer),
                             args=config(tmp_path, confidence="none", safety_margin=1.0, use_weighting=True),
                             train_dataset=margin_dataset(tokenizer, [1.0]), processing_class=tokenizer)


# ------------------------------------------------------------------------------------------------ the loss

def margin_dataset(tokenizer, margins: list[float]):
    """The first len(margins) of test_trainer's PAIRS with their `safety_margin`, built as `safedpo_dataset`
    builds them."""
    return preference_dataset([PreferencePair(p, c, r, meta={"safety_margin": m})
                               for (p, c, r), m in zip(PAIRS, margins)], tokenizer)


def hand_delta(policy, reference, tokenizer, n: int) -> torch.Tensor:
    """D = log pi/pi_ref(chosen) - log pi/pi_ref(rejected) per pair, from plain forwards."""
    deltas = []
    for prompt, chosen, rejected in PAIRS[:n]:
        prompt_text, chosen_text = render(tokenizer, prompt, chosen)
        _, rejected_text = render(tokenizer, prompt, rejected)
        deltas.append(sequence_logp(policy, tokenizer, prompt_text, chosen_text)
                      - sequence_logp(reference, tokenizer, prompt_text, chosen_text)
                      - sequence_logp(policy, tokenizer, prompt_text, rejected_text)
                      + sequence_logp(reference, tokenizer, prompt_text, rejected_text))
    return torch.stack(deltas)


def safedpo_loss(tokenizer, tmp_path, margins: list[float], delta_setting: float, **overrides) -> torch.Tensor:
    """The trainer's loss on one batch of all the pairs: policy seed 0, reference seed 1."""
    trainer = ConfidenceDPOTrainer(make_tiny_model(tokenizer, seed=0), ref_model=make_tiny_model(tokenizer, seed=1),
                                   args=config(tmp_path, confidence="none", safety_margin=delta_setting, **overrides),
                                   train_dataset=margin_dataset(tokenizer, margins), processing_class=tokenizer)
    return trainer.compute_loss(trainer.model, batch_of(trainer, len(margins))).detach()


def test_loss_matches_hand_computation(tokenizer, tmp_path):
    """-log sigmoid(beta D - m Delta) averaged over pairs, with the log-probs computed by hand."""
    margins, delta_setting, beta = [1.0, 0.0, 1.0, 1.0], 2.0, 0.5
    loss = safedpo_loss(tokenizer, tmp_path, margins, delta_setting, beta=beta)
    delta = hand_delta(make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1), tokenizer, 4)
    assert delta.abs().max() > 0.5, "policy and reference should differ for the test to mean something"
    expected = -F.logsigmoid(beta * delta - torch.tensor(margins) * delta_setting).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    plain = -F.logsigmoid(beta * delta).mean()
    assert loss > plain + 0.5, "the margin should add a visible amount on the safe-over-unsafe pairs"


def test_loss_on_known_log_probs(tokenizer, tmp_path):
    """With the reference log-probs set in the batch so that D is known, the loss is the formula on numbers:
    D = (1.5, -0.5, 3.0), m = (1, 0, 1), beta = 0.1, Delta = 10 (the paper's defaults)."""
    trainer = ConfidenceDPOTrainer(make_tiny_model(tokenizer, seed=0),
                                   args=config(tmp_path, confidence="none", safety_margin=10.0, beta=0.1,
                                               precompute_ref_log_probs=True),
                                   train_dataset=margin_dataset(tokenizer, [1.0, 0.0, 1.0]),
                                   processing_class=tokenizer)
    policy = make_tiny_model(tokenizer, seed=0)
    known = torch.tensor([1.5, -0.5, 3.0])
    logps = []
    for prompt, chosen, rejected in PAIRS[:3]:
        prompt_text, chosen_text = render(tokenizer, prompt, chosen)
        _, rejected_text = render(tokenizer, prompt, rejected)
        logps.append([sequence_logp(policy, tokenizer, prompt_text, t) for t in (chosen_text, rejected_text)])
    policy_chosen, policy_rejected = torch.stack([torch.stack(pair) for pair in logps]).T
    batch = batch_of(trainer, 3)
    batch["ref_chosen_logps"] = policy_chosen - known  # log pi/pi_ref(chosen) = D, of the rejected 0
    batch["ref_rejected_logps"] = policy_rejected.clone()
    loss = trainer.compute_loss(trainer.model, batch).detach()
    expected = sum(math.log1p(math.exp(-(0.1 * d - m * 10.0))) for d, m in zip([1.5, -0.5, 3.0], [1, 0, 1])) / 3
    assert abs(loss.item() - expected) <= 1e-5 * expected


def test_zero_margin_is_plain_dpo_bit_for_bit(tokenizer, tmp_path):
    """Delta = 0 ignores the column: the very loss of plain DPO (confidence='none') on the same pairs."""
    with_column = safedpo_loss(tokenizer, tmp_path, [1.0, 0.0, 1.0, 1.0], 0.0)
    trainer = ConfidenceDPOTrainer(make_tiny_model(tokenizer, seed=0), ref_model=make_tiny_model(tokenizer, seed=1),
                                   args=config(tmp_path, confidence="none"),
                                   train_dataset=preference_dataset([PreferencePair(*p) for p in PAIRS[:4]],
                                                                    tokenizer),
                                   processing_class=tokenizer)
    plain = trainer.compute_loss(trainer.model, batch_of(trainer, 4)).detach()
    assert torch.equal(with_column, plain)
    delta = hand_delta(make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1), tokenizer, 4)
    torch.testing.assert_close(plain, -F.logsigmoid(0.5 * delta).mean(), rtol=1e-5, atol=0)


def test_the_margin_raises_the_loss_only_on_safe_over_unsafe_pairs(tokenizer, tmp_path):
    """On a one-pair batch: m = 1 adds softplus(Delta - beta D) - softplus(-beta D) > 0; m = 0 adds nothing."""
    delta = hand_delta(make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1), tokenizer, 1)[0]
    off = safedpo_loss(tokenizer, tmp_path, [1.0], 0.0)
    on = safedpo_loss(tokenizer, tmp_path, [1.0], 3.0)
    assert on > off + 1.0
    torch.testing.assert_close(on - off, F.softplus(3.0 - 0.5 * delta) - F.softplus(-0.5 * delta),
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(safedpo_loss(tokenizer, tmp_path, [0.0], 3.0), off)


def test_training_reads_the_column_through_trls_dataloader(tokenizer, tmp_path):
    """The column survives TRL's tokenisation and its dataloader's column pruning, and training runs."""
    trainer = ConfidenceDPOTrainer(make_tiny_model(tokenizer, seed=0),
                                   args=config(tmp_path, confidence="none", safety_margin=10.0, max_steps=2),
                                   train_dataset=margin_dataset(tokenizer, [1.0, 0.0, 1.0, 1.0]),
                                   processing_class=tokenizer)
    assert "safety_margin" in trainer.train_dataset.column_names
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["safety_margin"].tolist()) in ([0.0, 1.0], [1.0, 1.0])
    trainer.train()
    logged = [entry["safedpo/margin_pairs"] for entry in trainer.state.log_history if "safedpo/margin_pairs" in entry]
    assert len(logged) == 2 and all(0.0 <= value <= 1.0 for value in logged)
