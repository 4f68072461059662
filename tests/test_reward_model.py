"""The hybrid reward model: learning, every probe trained, persistence, model checks, CLI metrics."""

from __future__ import annotations

import json

import pytest
import torch

from rbrm.errors import DataError
from rbrm.models import model_fingerprint
from rbrm.probe_train import cross_validate
from rbrm.reward_model import (
    HybridRewardModel,
    ModelMismatchError,
    RewardTrainConfig,
    probe_metrics,
    train_reward_model,
)


def synthetic(n_pairs=150, layers=3, hidden=16, seed=0):
    """Pairs whose safer side lies along a per-layer direction, plus noise; every layer carries signal."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(layers, hidden, generator=g)
    base = torch.randn(n_pairs, layers, hidden, generator=g)
    chosen = base + 0.5 * direction + 0.8 * torch.randn(n_pairs, layers, hidden, generator=g)
    rejected = base - 0.5 * direction + 0.8 * torch.randn(n_pairs, layers, hidden, generator=g)
    features = torch.stack([chosen, rejected], 1).reshape(2 * n_pairs, layers, hidden)
    pairs = torch.arange(2 * n_pairs).reshape(n_pairs, 2)
    return features, pairs


@pytest.mark.parametrize("fit", ["staged", "joint"])
def test_loss_goes_down_and_every_probe_parameter_changes(fit):
    features, pairs = synthetic()
    settings = RewardTrainConfig(epochs=40, patience=1000, seed=0, fit=fit)
    untrained = HybridRewardModel(3, 16)
    model, metrics = train_reward_model(features, pairs, None, settings, progress=False)
    # On pairs alone a probe's bias cancels out of r_c - r_r, and on these separable pairs every layer is right, so
    # the staged fit has no reason to move the bias or the gate (test_the_gate_learns_which_layers_to_trust does)
    for name in ("weight",) + (("bias", "gate") if fit == "joint" else ()):
        before, after = getattr(untrained, name), getattr(model, name)
        changed = (after - before).abs().reshape(after.shape[0], -1).amax(1)
        assert (changed > 0).all(), f"{name}: some layer's parameters did not change"
    from rbrm.reward_model import _losses

    untrained.fit_standardizer(features)
    loss_before = _losses(untrained, features, pairs, None, None, settings).item()
    loss_after = _losses(model, features, pairs, None, None, settings).item()
    assert loss_after < 0.85 * loss_before
    assert metrics["val_pair_accuracy"] > 0.8 and metrics["fit"] == fit
    assert len(metrics["per_layer_accuracy"]) == 3 and min(metrics["per_layer_accuracy"]) > 0.6
    assert len(metrics["val_gate_weights"]) == 3


@pytest.mark.parametrize("fit", ["staged", "joint"])
def test_pointwise_training_on_labels(fit):
    features, pairs = synthetic(seed=1)
    labels = torch.zeros(features.shape[0], dtype=torch.long)
    labels[pairs[:, 0]] = 1
    model, metrics = train_reward_model(features, None, labels, RewardTrainConfig(epochs=60, fit=fit), progress=False)
    assert metrics["val_accuracy"] > 0.75
    assert "val_pair_accuracy" not in metrics


def test_split_keeps_prompt_groups_apart():
    features, pairs = synthetic(n_pairs=60)
    groups = torch.arange(features.shape[0]) // 8  # 4 pairs share a prompt
    _, metrics = train_reward_model(features, pairs, None, RewardTrainConfig(epochs=5), groups=groups, progress=False)
    assert metrics["n_val_pairs"] % 4 == 0 and metrics["n_train_pairs"] % 4 == 0


def test_cross_validation_reports_each_fold_and_the_baseline_on_the_same_folds():
    features, pairs = synthetic(n_pairs=90, seed=2)
    result = cross_validate(features, pairs, None, RewardTrainConfig(epochs=30), k=3)
    assert len(result["cv_folds"]) == 3 and result["cv_accuracy"] > 0.75
    assert len(result["baseline_cv_folds"]) == 3 and result["baseline_cv_accuracy"] > 0.6


def some_layers_carry_signal(n_rows=400, layers=6, hidden=24, informative=(3, 4), seed=0):
    """Labelled rows where only `informative` layers separate safe from unsafe; the others are pure noise."""
    g = torch.Generator().manual_seed(seed)
    safe = (torch.arange(n_rows) % 2).long()
    features = torch.randn(n_rows, layers, hidden, generator=g)
    direction = torch.randn(hidden, generator=g)
    for layer in informative:
        features[:, layer] += 0.35 * (2 * safe - 1).float()[:, None] * direction
    return features, safe


def test_the_gate_learns_which_layers_to_trust():
    features, safe = some_layers_carry_signal()
    model, metrics = train_reward_model(features, None, safe, RewardTrainConfig(), progress=False)
    assert model.gate.abs().max() > 1e-3 and (model.gate_bias - model.gate_bias.mean()).abs().max() > 0.1
    share = torch.tensor(metrics["val_gate_share"])
    assert share[[3, 4]].sum() > 0.6  # uniform would give them 2/6 = 0.33
    assert metrics["val_accuracy"] >= metrics["val_best_probe_accuracy"] - 0.02
    assert metrics["val_accuracy"] >= metrics["val_mean_probe_accuracy"] - 0.02
    # the staged fit chose each probe's penalty on the training side: noise layers get the strongest ones
    penalties = torch.tensor(metrics["probe_penalties"])
    assert penalties[[0, 1, 2, 5]].min() > penalties[[3, 4]].max()


def test_the_papers_vote_gate_keeps_its_bias_at_zero(tmp_path):
    features, safe = some_layers_carry_signal(n_rows=120)
    for fit in ("staged", "joint"):
        model, _ = train_reward_model(features, None, safe, RewardTrainConfig(fit=fit, gate="vote", epochs=20),
                                      progress=False)
        assert model.gate_kind == "vote" and not model.gate_bias.requires_grad
        assert (model.gate_bias == 0).all() and model.gate.abs().max() > 0
    model.save(str(tmp_path / "vote"))
    assert HybridRewardModel.load(str(tmp_path / "vote")).gate_kind == "vote"
    with pytest.raises(ValueError, match="gate must be one of"):
        train_reward_model(features, None, safe, RewardTrainConfig(gate="softmax"), progress=False)


def test_the_mean_gate_weighs_every_layer_alike(tmp_path):
    features, safe = some_layers_carry_signal(n_rows=120)
    for fit in ("staged", "joint"):
        model, metrics = train_reward_model(features, None, safe, RewardTrainConfig(fit=fit, gate="mean", epochs=20),
                                            progress=False)
        assert not model.gate.requires_grad and not model.gate_bias.requires_grad
        assert (model.gate == 0).all() and (model.gate_bias == 0).all()
        assert metrics["val_gate_share"] == pytest.approx([1 / 6] * 6)
    model.save(str(tmp_path / "mean"))
    loaded = HybridRewardModel.load(str(tmp_path / "mean"))
    assert loaded.gate_kind == "mean" and not loaded.gate.requires_grad


def test_a_version_1_probe_loads_as_the_papers_vote_gate(tmp_path):
    from safetensors.torch import load_file, save_file

    from rbrm.files import file_digest
    from rbrm.reward_model import CONFIG_FILE, WEIGHTS_FILE

    rm = HybridRewardModel(2, 4, {"gate": "vote"})
    rm.weight.data.normal_()
    rm.save(str(tmp_path))
    weights, config_path = tmp_path / WEIGHTS_FILE, tmp_path / CONFIG_FILE
    tensors = load_file(str(weights))
    del tensors["gate_bias"]
    save_file(tensors, str(weights))
    config = json.loads(config_path.read_text())
    del config["gate"]
    config.update(format_version=1, weights_sha256=file_digest(weights, None))
    config_path.write_text(json.dumps(config))
    loaded = HybridRewardModel.load(str(tmp_path))
    assert loaded.gate_kind == "vote" and (loaded.gate_bias == 0).all()
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(loaded(x), rm(x))


def test_the_row_space_fit_is_the_same_probe_as_the_full_width_fit():
    """d > n: fitting in the n-wide row space and mapping back gives the d-wide fit's scores."""
    from rbrm.reward_model import _fit_probes, _probe_scores, _row_space

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 30, 80, generator=g)
    safe = (torch.arange(30) % 2).long()
    z[:, :, 0] += (2 * safe - 1).float()
    rows, no_pairs = torch.arange(30), torch.empty(0, 2, dtype=torch.long)
    penalty = torch.full((2,), 0.1)
    x, to_weight = _row_space(z)
    assert x.shape == (2, 30, 30)
    beta, bias = _fit_probes(x, no_pairs, rows, safe, penalty)
    weight = torch.bmm(z.transpose(1, 2), torch.bmm(to_weight, beta[:, :, None])).squeeze(-1)
    direct = _fit_probes(z, no_pairs, rows, safe, penalty)
    torch.testing.assert_close(_probe_scores(z, (weight, bias)), _probe_scores(z, direct), atol=2e-3, rtol=2e-3)


def test_save_load_round_trip(tmp_path):
    features, pairs = synthetic(n_pairs=40)
    model, _ = train_reward_model(features, pairs, None, RewardTrainConfig(epochs=5), progress=False,
                                  config={"layers": [2, 4, 6], "pooling": "mean"})
    model.save(str(tmp_path / "rm"))
    loaded = HybridRewardModel.load(str(tmp_path / "rm"))
    torch.testing.assert_close(loaded(features), model(features))
    assert loaded.layers == [2, 4, 6] and loaded.pooling == "mean"
    files = sorted(p.name for p in (tmp_path / "rm").iterdir())
    assert files == ["config.json", "reward_model.safetensors"]
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["hidden_size"] == 16
    with pytest.raises(DataError, match="reward model saved by rbrm"):
        HybridRewardModel.load(str(tmp_path / "nothing"))


def test_model_mismatch_is_refused(tokenizer, tiny_model):
    from tests.conftest import make_tiny_model

    rm = HybridRewardModel(3, 64, {"model": model_fingerprint(tiny_model), "layers": [1, 2, 3]})
    rm.check_model(tiny_model)  # same model: fine
    with pytest.raises(ModelMismatchError, match="num_layers"):
        rm.check_model(make_tiny_model(tokenizer, layers=2))
    with pytest.warns(UserWarning, match="other weights"):
        rm.check_model(make_tiny_model(tokenizer, seed=1))
    with pytest.raises(ValueError, match="do not fit"):
        rm(torch.randn(2, 2, 64))


def test_evaluate_hard_accuracy_counts_each_side():
    rm = HybridRewardModel(1, 1)
    rm.weight.data.fill_(1.0)  # gate V = 0 -> g = 0.5, so r = x / 2
    features = torch.tensor([[[2.0]], [[1.0]], [[-1.0]], [[-2.0]]])
    metrics = probe_metrics(rm, features, torch.tensor([[0, 1], [2, 3]]))
    assert metrics["pair_accuracy"] == 1.0  # 1 > 0.5 and -0.5 > -1
    assert metrics["hard_accuracy"] == 0.5  # chosen 1 >= 0 yes, -0.5 no; rejected 0.5 <= 0 no, -1 yes
    assert metrics["gate_weights"] == [0.5] and metrics["gate_share"] == [1.0]


def test_probe_train_cli_writes_metrics(tiny_model_dir, tmp_path):
    from rbrm.cli import main

    data = tmp_path / "pairs.jsonl"
    rows = []
    for i in range(24):
        rows.append({"prompt": f"How do I do harmful thing number {i}?", "chosen": "Sorry, I can't help with that.",
                     "rejected": f"Sure! Step one for thing {i}: get the tools."})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out, metrics_path = tmp_path / "rm", tmp_path / "metrics.json"
    assert main(["probe", "train", "--model", tiny_model_dir, "--data", str(data), "--out", str(out),
                 "--epochs", "20", "--cv", "2", "--metrics-out", str(metrics_path)]) == 0
    metrics = json.loads(metrics_path.read_text())
    for key in ("val_pair_accuracy", "cv_accuracy", "per_layer_accuracy", "val_gate_weights", "baseline_val_accuracy",
                "val_mean_probe_accuracy", "val_best_probe_accuracy", "baseline_cv_accuracy"):
        assert key in metrics, key
    assert len(metrics["per_layer_accuracy"]) == 3
    loaded = HybridRewardModel.load(str(out))
    assert loaded.config["model"]["num_layers"] == 3 and loaded.layers == [1, 2, 3]


@pytest.mark.parametrize("fit", ["staged", "joint"])
def test_the_calibrated_confidence_is_graded(fit):
    """On overlapping pairs, sigmoid(a gap) is a probability: strictly inside (0.5, 1) for a moderate gap, spread
    over the pairs, and it matches the observed accuracy on held-out pairs within a loose ECE."""
    g = torch.Generator().manual_seed(3)
    n, layers, hidden = 300, 3, 8
    direction = torch.randn(hidden, generator=g)
    chosen = 0.25 * direction + torch.randn(n, layers, hidden, generator=g)
    rejected = -0.25 * direction + torch.randn(n, layers, hidden, generator=g)
    features = torch.stack([chosen, rejected], 1).reshape(2 * n, layers, hidden)
    pairs = torch.arange(2 * n).reshape(n, 2)
    model, metrics = train_reward_model(features, pairs, None, RewardTrainConfig(fit=fit), progress=False)
    scale = metrics["calibration_scale"]
    assert 0.01 < scale < 100
    with torch.no_grad():
        reward = model(features)
    gap = reward[pairs[:, 0]] - reward[pairs[:, 1]]
    gamma = torch.sigmoid(scale * gap)
    moderate = gamma[(gap > gap.quantile(0.6)) & (gap < gap.quantile(0.8))]
    assert (moderate > 0.5).all() and (moderate < 0.999).all()
    assert gamma.std() > 0.05
    assert 0.55 < metrics["val_pair_accuracy"] < 0.97  # overlapping on purpose
    assert metrics["val_ece"] < (0.15 if fit == "staged" else 0.25)  # 60 held-out pairs in 10 bins: a noisy ECE
    quantiles = metrics["val_confidence_quantiles"]
    assert quantiles["q05"] < quantiles["q50"] < quantiles["q95"] < 1.0


def test_calibration_stays_finite_when_the_rewards_separate_every_pair():
    from rbrm.reward_model import calibrate

    reward = torch.cat([torch.full((50,), 5.0), torch.full((50,), -5.0)])
    pairs = torch.stack([torch.arange(50), torch.arange(50, 100)], 1)
    empty = torch.empty(0, dtype=torch.long)
    result = calibrate(reward, pairs, empty, empty)
    assert 1.0 < result["scale"] < 20  # the likelihood alone would send it to infinity
    assert torch.sigmoid(torch.tensor(result["scale"] * 1.0)) < 0.999  # a gap of 1 is not certainty


def test_recalibration_on_the_policys_answers_tempers_an_overconfident_probe():
    """A probe that separates its own data perfectly, applied to answers whose labels it gets wrong a quarter of
    the time with the same large rewards: the scale fitted on those answers is smaller, and the calibration
    error there drops."""
    from rbrm.feature_files import FeatureSet
    from rbrm.reward_model import recalibrate

    g = torch.Generator().manual_seed(4)
    n, layers, hidden = 200, 2, 8
    direction = torch.randn(hidden, generator=g)
    safe = (torch.arange(n) % 2).long()
    sign = (2 * safe - 1).float()[:, None, None]
    easy = 3.0 * sign * direction + 0.3 * torch.randn(n, layers, hidden, generator=g)
    model, metrics = train_reward_model(easy, None, safe, RewardTrainConfig(), progress=False)
    fresh = 3.0 * sign * direction + 0.3 * torch.randn(n, layers, hidden, generator=g)
    noisy = torch.where(torch.rand(n, generator=g) < 0.25, 1 - safe, safe)  # a quarter of the labels flipped
    before = metrics["calibration_scale"]
    result = recalibrate(model, FeatureSet(fresh, noisy), "hard answers")
    assert result["calibration_scale"] < 0.5 * before and model.calibration["fitted_on"] == "hard answers"
    assert result["calibration_data_ece"] < result["calibration_data_ece_before"]
    assert 0.6 < result["calibration_data_auc"] < 0.99
