"""The hybrid reward model: learning, every probe trained, persistence, model checks, CLI metrics."""

from __future__ import annotations

import json

import pytest
import torch

from rbrm.data import DataError
from rbrm.models import model_fingerprint
from rbrm.reward_model import (
    HybridRewardModel,
    ModelMismatchError,
    TrainSettings,
    cross_validate,
    evaluate,
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


def test_loss_goes_down_and_every_probe_parameter_changes():
    features, pairs = synthetic()
    settings = TrainSettings(epochs=40, patience=1000, seed=0)
    untrained = HybridRewardModel(3, 16)
    model, metrics = train_reward_model(features, pairs, None, settings, progress=False)
    for name in ("weight", "bias", "gate"):
        before, after = getattr(untrained, name), getattr(model, name)
        changed = (after - before).abs().reshape(after.shape[0], -1).amax(1)
        assert (changed > 0).all(), f"{name}: some layer's parameters did not change"
    from rbrm.reward_model import _losses

    untrained.fit_standardizer(features)
    loss_before = _losses(untrained, features, pairs, None, None, settings).item()
    loss_after = _losses(model, features, pairs, None, None, settings).item()
    assert loss_after < 0.85 * loss_before
    assert metrics["val_pair_accuracy"] > 0.8
    assert len(metrics["per_layer_accuracy"]) == 3 and min(metrics["per_layer_accuracy"]) > 0.6
    assert len(metrics["val_gate_weights"]) == 3


def test_pointwise_training_on_labels():
    features, pairs = synthetic(seed=1)
    labels = torch.zeros(features.shape[0], dtype=torch.long)
    labels[pairs[:, 0]] = 1
    model, metrics = train_reward_model(features, None, labels, TrainSettings(epochs=60), progress=False)
    assert metrics["val_accuracy"] > 0.75
    assert "val_pair_accuracy" not in metrics


def test_split_keeps_prompt_groups_apart():
    features, pairs = synthetic(n_pairs=60)
    groups = torch.arange(features.shape[0]) // 8  # 4 pairs share a prompt
    _, metrics = train_reward_model(features, pairs, None, TrainSettings(epochs=5), groups=groups, progress=False)
    assert metrics["n_val_pairs"] % 4 == 0 and metrics["n_train_pairs"] % 4 == 0


def test_cross_validation_reports_each_fold():
    features, pairs = synthetic(n_pairs=90, seed=2)
    result = cross_validate(features, pairs, None, TrainSettings(epochs=30), k=3)
    assert len(result["cv_folds"]) == 3 and result["cv_accuracy"] > 0.75


def test_save_load_round_trip(tmp_path):
    features, pairs = synthetic(n_pairs=40)
    model, _ = train_reward_model(features, pairs, None, TrainSettings(epochs=5), progress=False,
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
    metrics = evaluate(rm, features, torch.tensor([[0, 1], [2, 3]]))
    assert metrics["pair_accuracy"] == 1.0  # 1 > 0.5 and -0.5 > -1
    assert metrics["hard_accuracy"] == 0.5  # chosen 1 >= 0 yes, -0.5 no; rejected 0.5 <= 0 no, -1 yes
    assert metrics["gate_weights"] == [0.5]


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
    for key in ("val_pair_accuracy", "cv_accuracy", "per_layer_accuracy", "val_gate_weights", "baseline_val_accuracy"):
        assert key in metrics, key
    assert len(metrics["per_layer_accuracy"]) == 3
    loaded = HybridRewardModel.load(str(out))
    assert loaded.config["model"]["num_layers"] == 3 and loaded.layers == [1, 2, 3]
