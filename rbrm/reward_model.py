"""The hybrid reward model: one linear probe per layer, mixed by a learned vote gate (METHOD.md section 2).

    s_l = w_l . z_l + b_l,   z_l = (h_l - mean_l) / std_l     (per-layer standardisation, saved with the model)
    g   = sigmoid(V s),      V in R^{L x L}
    r   = sum_l g_l s_l

Trained on pairs (safer, less safe) with -log sigmoid(r_c - r_r - m) and/or on labelled single responses
with a logistic loss. Each probe also gets the same loss on its own score (`layer_loss_weight`), so every
layer's probe is a usable reward by itself and per-layer accuracy means something.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataError, read_json_file
from .errors import RbrmError

FORMAT_VERSION = 1
WEIGHTS_FILE = "reward_model.safetensors"
CONFIG_FILE = "config.json"


class ModelMismatchError(RbrmError, ValueError):
    """A probe was about to be applied to hidden states of a model it was not trained on."""


class HybridRewardModel(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, config: dict | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, hidden_size))  # w_l, one probe per row
        self.bias = nn.Parameter(torch.zeros(num_layers))  # b_l
        self.gate = nn.Parameter(torch.zeros(num_layers, num_layers))  # V
        self.register_buffer("feature_mean", torch.zeros(num_layers, hidden_size))
        self.register_buffer("feature_std", torch.ones(num_layers, hidden_size))
        self.config = dict(config or {})

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def layers(self) -> list[int]:
        """1-based decoder layers whose hidden states this model reads."""
        return list(self.config.get("layers") or range(1, self.num_layers + 1))

    @property
    def pooling(self) -> str:
        return self.config.get("pooling", "last")

    @torch.no_grad()
    def fit_standardizer(self, features: torch.Tensor) -> None:
        flat = features.float()
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp_min(1e-4))

    def layer_scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> per-layer probe scores s [B, L]."""
        if features.shape[1:] != self.weight.shape:
            raise ValueError(f"features of shape {tuple(features.shape)} do not fit a probe over "
                             f"{self.num_layers} layers of size {self.weight.shape[1]}")
        z = (features.to(self.weight.dtype) - self.feature_mean) / self.feature_std
        return (z * self.weight).sum(-1) + self.bias

    def gate_weights(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(scores @ self.gate.T)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reward r [B] for features [B, L, d]."""
        return self.reward_from_scores(self.layer_scores(features))

    def reward_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return (self.gate_weights(scores) * scores).sum(-1)

    # ----------------------------------------------------------------------------------- persistence

    def save(self, directory: str) -> None:
        """safetensors weights + JSON config, written atomically into `directory`."""
        from safetensors.torch import save_file

        from .data import atomic_path, write_json

        config = {"end_of_turn": None, **self.config, "layers": self.layers, "pooling": self.pooling,
                  "format_version": FORMAT_VERSION, "num_layers": self.num_layers,
                  "hidden_size": int(self.weight.shape[1])}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(os.path.join(directory, WEIGHTS_FILE)) as tmp:
            save_file(tensors, str(tmp))
            config["weights_sha256"] = _sha256(tmp)  # checked on load: flipped bytes must not score silently
        write_json(os.path.join(directory, CONFIG_FILE), config)

    @classmethod
    def load(cls, directory: str, map_location: str | torch.device = "cpu") -> HybridRewardModel:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config_path = os.path.join(directory, CONFIG_FILE)
        weights_path = os.path.join(directory, WEIGHTS_FILE)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise DataError(path, None, None, f"not found: is {directory} a reward model saved by rbrm?")
        config = read_json_file(config_path)
        if not isinstance(config, dict):
            raise DataError(config_path, None, None, f"expected a JSON object, got {type(config).__name__}")
        _check_probe_config(config, config_path)
        actual = _sha256(weights_path)
        if config["weights_sha256"] != actual:
            raise DataError(weights_path, None, None, f"checksum {actual[:16]}… differs from the one in "
                            f"{CONFIG_FILE} ({config['weights_sha256'][:16]}…): the file is corrupt or was "
                            "replaced; retrain or restore it")
        model = cls(config["num_layers"], config["hidden_size"], config)
        try:
            model.load_state_dict(load_file(weights_path, device=str(map_location)))
        except (RuntimeError, OSError, SafetensorError) as err:  # wrong shapes, or a file it cannot parse
            raise DataError(weights_path, None, None, f"cannot load the probe weights: {err}") from None
        return model

    def check_model(self, model) -> None:
        """Refuse a policy whose architecture differs from the one the probe was trained on.

        Same shape but different weights (a fine-tuned descendant, the usual case in DPO) only warns.
        """
        from .models import model_fingerprint

        expected = self.config.get("model")
        if not expected:
            warnings.warn("this reward model records no base model; it cannot be checked", stacklevel=2)
            return
        actual = model_fingerprint(model)
        for key in ("model_type", "num_layers", "hidden_size", "vocab_size"):
            if key in expected and expected[key] != actual[key]:
                raise ModelMismatchError(
                    f"reward model was trained on {expected.get('name')!r} ({key}={expected[key]}) but the "
                    f"model given is {actual['name']!r} ({key}={actual[key]})")
        if max(self.layers) > actual["num_layers"]:
            raise ModelMismatchError(f"reward model reads layers up to {max(self.layers)}; the model has "
                                     f"{actual['num_layers']}")
        if expected.get("embedding_sha256") not in (None, actual["embedding_sha256"]):
            warnings.warn(f"model {actual['name']!r} has the reward model's architecture but other weights "
                          f"than {expected.get('name')!r}; fine for a fine-tuned descendant", stacklevel=2)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_probe_config(config: dict, path: str) -> None:
    """Every field a probe needs to be applied as trained; a missing one is an error, never a default."""
    for key, ok, expected in (
            ("num_layers", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            ("hidden_size", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            ("layers", lambda v: isinstance(v, list) and v and all(isinstance(x, int) and x > 0 for x in v),
             "a list of 1-based layer numbers"),
            ("pooling", lambda v: v in ("last", "mean"), "'last' or 'mean'"),
            ("end_of_turn", lambda v: v is None or isinstance(v, str), "the end-of-turn text or null"),
            ("weights_sha256", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest")):
        if key not in config:
            raise DataError(path, None, key, "missing (this probe config cannot be applied as it was trained)")
        if not ok(config[key]):
            raise DataError(path, None, key, f"expected {expected}, got {config[key]!r}")
    if len(config["layers"]) != config["num_layers"]:
        raise DataError(path, None, "layers", f"{len(config['layers'])} layers listed, num_layers is "
                        f"{config['num_layers']}")


# ------------------------------------------------------------------------------------------- training


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - m), averaged (also over a trailing layer axis if present)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def pointwise_loss(scores: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    target = safe.float()
    if scores.dim() == 2:
        target = target[:, None].expand_as(scores)
    return F.binary_cross_entropy_with_logits(scores, target)


@dataclass
class TrainSettings:
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    margin: float = 1.0
    layer_loss_weight: float = 1.0
    patience: int = 25
    val_fraction: float = 0.2
    seed: int = 0


def row_groups(n_rows: int, pairs: torch.Tensor | None, groups: torch.Tensor | None) -> torch.Tensor:
    """Group id per row: the given prompt groups, else each pair's two rows together, else each row alone."""
    if groups is not None:
        return groups
    result = torch.arange(n_rows)
    if pairs is not None and len(pairs):
        result[pairs[:, 1]] = result[pairs[:, 0]]
    return result


def _split(n: int, groups: torch.Tensor | None, fraction: float, generator: torch.Generator):
    """Random train/val split of n items; items of one group (same prompt) stay on one side."""
    if groups is None:
        groups = torch.arange(n)
    unique = torch.unique(groups)
    order = unique[torch.randperm(len(unique), generator=generator)]
    n_val = max(1, int(round(len(unique) * fraction))) if fraction > 0 else 0
    val_groups = order[:n_val]
    is_val = torch.isin(groups, val_groups)
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def _losses(model: HybridRewardModel, features, pairs, labelled_rows, labels, settings: TrainSettings):
    total = features.new_zeros(())
    if pairs is not None and len(pairs):
        s_c, s_r = model.layer_scores(features[pairs[:, 0]]), model.layer_scores(features[pairs[:, 1]])
        total = total + pairwise_loss(model.reward_from_scores(s_c), model.reward_from_scores(s_r), settings.margin)
        total = total + settings.layer_loss_weight * pairwise_loss(s_c, s_r, settings.margin)
    if labelled_rows is not None and len(labelled_rows):
        s = model.layer_scores(features[labelled_rows])
        total = total + pointwise_loss(model.reward_from_scores(s), labels)
        total = total + settings.layer_loss_weight * pointwise_loss(s, labels)
    return total


@torch.no_grad()
def evaluate(model: HybridRewardModel, features: torch.Tensor, pairs: torch.Tensor | None = None,
             labelled_rows: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict:
    """Pair accuracy (r_c > r_r), hard accuracy, labelled accuracy, per-layer accuracy, gate weights."""
    model.eval()
    metrics: dict = {}
    scores = model.layer_scores(features)
    reward = model.reward_from_scores(scores)
    metrics["gate_weights"] = model.gate_weights(scores).mean(0).tolist()
    if pairs is not None and len(pairs):
        r_c, r_r = reward[pairs[:, 0]], reward[pairs[:, 1]]
        metrics["pair_accuracy"] = (r_c > r_r).float().mean().item()
        metrics["hard_accuracy"] = torch.cat([r_c >= 0, r_r <= 0]).float().mean().item()
        metrics["per_layer_accuracy"] = (scores[pairs[:, 0]] > scores[pairs[:, 1]]).float().mean(0).tolist()
        metrics["n_pairs"] = len(pairs)
    if labelled_rows is not None and len(labelled_rows):
        truth = labels.bool()
        metrics["accuracy"] = ((reward[labelled_rows] > 0) == truth).float().mean().item()
        per_layer = ((scores[labelled_rows] > 0) == truth[:, None]).float().mean(0).tolist()
        metrics.setdefault("per_layer_accuracy", per_layer)
        metrics["per_layer_labelled_accuracy"] = per_layer
        metrics["n_labelled"] = len(labelled_rows)
    return metrics


def _primary(metrics: dict) -> float:
    return metrics.get("pair_accuracy", metrics.get("accuracy", float("nan")))


def train_reward_model(features: torch.Tensor, pairs: torch.Tensor | None, labels: torch.Tensor | None,
                       settings: TrainSettings, groups: torch.Tensor | None = None, config: dict | None = None,
                       progress: bool = True) -> tuple[HybridRewardModel, dict]:
    """Fit on a train split, early-stop on a validation split (split by prompt group when known).

    labels: [N] with 1 = safe, 0 = unsafe, -1 = unknown (rows that only appear in pairs).
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    n_rows = features.shape[0]
    labelled_all = torch.nonzero(labels >= 0).flatten() if labels is not None else torch.empty(0, dtype=torch.long)
    pairs = pairs if pairs is not None else torch.empty(0, 2, dtype=torch.long)
    if not len(pairs) and not len(labelled_all):
        raise ValueError("nothing to train on: no pairs and no labelled rows")
    row_group = row_groups(n_rows, pairs, groups)
    # Split pairs and labelled rows with one row-level decision, so a prompt never sits on both sides.
    train_rows, val_rows = _split(n_rows, row_group, settings.val_fraction, generator)
    is_val = torch.zeros(n_rows, dtype=torch.bool)
    is_val[val_rows] = True
    train_pairs, val_pairs = pairs[~is_val[pairs[:, 0]]], pairs[is_val[pairs[:, 0]]]
    train_lab, val_lab = labelled_all[~is_val[labelled_all]], labelled_all[is_val[labelled_all]]
    model = HybridRewardModel(features.shape[1], features.shape[2], config)
    fit_rows = torch.unique(torch.cat([train_pairs.flatten(), train_lab]))
    model.fit_standardizer(features[fit_rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    has_val = len(val_pairs) + len(val_lab) > 0
    best = (-math.inf, math.inf)
    best_state, best_epoch, history = None, 0, []
    bar = tqdm(range(settings.epochs), desc="probe", disable=not progress)
    for epoch in bar:
        model.train()
        order_p = train_pairs[torch.randperm(len(train_pairs), generator=generator)]
        order_l = train_lab[torch.randperm(len(train_lab), generator=generator)]
        steps = max(1, math.ceil(max(len(order_p), len(order_l)) / settings.batch_size))
        for step in range(steps):
            batch_p = order_p[step * settings.batch_size:(step + 1) * settings.batch_size]
            batch_l = order_l[step * settings.batch_size:(step + 1) * settings.batch_size]
            loss = _losses(model, features, batch_p, batch_l, labels[batch_l] if len(batch_l) else None, settings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if not has_val:
            best_state, best_epoch = {k: v.clone() for k, v in model.state_dict().items()}, epoch
            continue
        model.eval()
        with torch.no_grad():
            val_loss = _losses(model, features, val_pairs, val_lab, labels[val_lab] if len(val_lab) else None,
                               settings).item()
        metric = _primary(evaluate(model, features, val_pairs, val_lab, labels[val_lab] if len(val_lab) else None))
        history.append({"epoch": epoch, "val_loss": val_loss, "val_metric": metric})
        bar.set_postfix(val_loss=f"{val_loss:.3f}", val_acc=f"{metric:.3f}")
        if (metric, -val_loss) > (best[0], -best[1]):
            best, best_epoch = (metric, val_loss), epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= settings.patience:
            break
    model.load_state_dict(best_state)
    metrics = {"best_epoch": best_epoch, "epochs_run": len(history) or settings.epochs,
               "n_train_pairs": len(train_pairs), "n_val_pairs": len(val_pairs),
               "n_train_labelled": len(train_lab), "n_val_labelled": len(val_lab)}
    val = evaluate(model, features, val_pairs, val_lab, labels[val_lab] if len(val_lab) else None)
    metrics.update({f"val_{k}": v for k, v in val.items()})
    metrics["per_layer_accuracy"] = val.get("per_layer_accuracy")
    metrics["settings"] = asdict(settings)
    model.config["train_metrics"] = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    return model, metrics


def cross_validate(features, pairs, labels, settings: TrainSettings, k: int, groups=None) -> dict:
    """K-fold accuracy: each fold is held out once; early stopping uses a split of the other folds."""
    row_group = row_groups(features.shape[0], pairs, groups)
    unique = torch.unique(row_group)
    unique = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(settings.seed))]
    folds = torch.chunk(unique, k)
    scores = []
    for i, fold in enumerate(folds):
        held = torch.isin(row_group, fold)
        keep_pairs = pairs[~held[pairs[:, 0]]] if pairs is not None else None
        test_pairs = pairs[held[pairs[:, 0]]] if pairs is not None else None
        train_labels = test_labels = None
        if labels is not None:
            train_labels = torch.where(held, -1, labels)
            test_labels = torch.where(held, labels, -1)
        model, _ = train_reward_model(features, keep_pairs, train_labels, settings, groups, progress=False)
        lab_rows = torch.nonzero(test_labels >= 0).flatten() if test_labels is not None else None
        result = evaluate(model, features, test_pairs, lab_rows,
                          test_labels[lab_rows] if lab_rows is not None else None)
        scores.append(_primary(result))
        print(f"fold {i + 1}/{k}: accuracy {scores[-1]:.3f}")
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1)) ** 0.5
    return {"cv_accuracy": mean, "cv_std": std, "cv_folds": scores}


def logistic_baseline(features, pairs, labels, train_mask_rows: torch.Tensor, seed: int = 0) -> dict:
    """scikit-learn logistic regression on the best single layer (chosen by CV on the train side)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.preprocessing import StandardScaler

    def design(layer: int, rows_mask: torch.Tensor):
        x = features[:, layer].numpy()
        if pairs is not None and len(pairs):
            p = pairs[rows_mask[pairs[:, 0]]].numpy()
            diff = x[p[:, 0]] - x[p[:, 1]]
            return np.concatenate([diff, -diff]), np.concatenate([np.ones(len(p)), np.zeros(len(p))])
        rows = torch.nonzero(rows_mask & (labels >= 0)).flatten().numpy()
        return x[rows], labels[rows].numpy()

    best_layer, best_cv = 0, -1.0
    for layer in range(features.shape[1]):
        x, y = design(layer, train_mask_rows)
        clf = LogisticRegression(C=0.1, max_iter=2000, fit_intercept=pairs is None or not len(pairs))
        pipe_x = StandardScaler(with_mean=pairs is None or not len(pairs)).fit_transform(x)
        cv = cross_val_score(clf, pipe_x, y, cv=3).mean()
        if cv > best_cv:
            best_layer, best_cv = layer, cv
    x_train, y_train = design(best_layer, train_mask_rows)
    x_test, y_test = design(best_layer, ~train_mask_rows)
    scaler = StandardScaler(with_mean=pairs is None or not len(pairs)).fit(x_train)
    clf = LogisticRegression(C=0.1, max_iter=2000, fit_intercept=pairs is None or not len(pairs))
    clf.fit(scaler.transform(x_train), y_train)
    accuracy = float((clf.predict(scaler.transform(x_test)) == y_test).mean()) if len(y_test) else float("nan")
    return {"baseline_layer_index": best_layer, "baseline_train_cv_accuracy": float(best_cv),
            "baseline_val_accuracy": accuracy}


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class ProbeTrainConfig:
    out: str = field(metadata={"help": "output directory for the reward model"})
    data: str | None = field(default=None, metadata={"help": "pairs or labelled responses (needs --model)"})
    features: str | None = field(default=None, metadata={"help": "a features .safetensors file instead of --data"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "model whose hidden states are used"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N pairs/rows of --data"})
    test_data: str | None = field(default=None, metadata={"help": "another data set to test on (needs --model)"})
    test_features: str | None = field(default=None, metadata={"help": "another features file to test on"})
    test_limit: int | None = field(default=None, metadata={"help": "use only the first N rows of --test-data"})
    layers: list[int] | None = field(default=None, metadata={"help": "1-based layers (default: all)"})
    pooling: str = field(default="last", metadata={"help": "last (end-of-turn token) or mean"})
    dtype: str = field(default="auto", metadata={"help": "dtype of the model forward"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda"})
    batch_tokens: int = field(default=4096, metadata={"help": "at most this many padded tokens per forward"})
    features_out: str | None = field(default=None, metadata={"help": "also save the computed features here"})
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    margin: float = field(default=1.0, metadata={"help": "pairwise margin m"})
    layer_loss_weight: float = field(default=1.0, metadata={"help": "weight of each probe's own loss"})
    patience: int = field(default=25, metadata={"help": "early-stopping patience in epochs"})
    val_fraction: float = 0.2
    seed: int = 0
    cv: int = field(default=0, metadata={"help": "K for K-fold cross-validated accuracy (0: off)"})
    baseline: bool = field(default=True, metadata={"help": "also fit the sklearn best-single-layer baseline"})
    metrics_out: str | None = field(default=None, metadata={"help": "write metrics JSON here"})
    model_name: str | None = field(default=None, metadata={"help": "a label recorded in the saved config"})


def _features_for(config: ProbeTrainConfig, data: str, limit: int | None, model_cache: dict,
                  stats: dict | None = None):
    """Compute (FeatureSet, groups) for a data file with the configured model."""
    from .data import load_examples
    from .features import FeatureSet, examples_to_rows, extract_features, feature_metadata, resolve_layers
    from .models import load_model
    from .render import prompt_key

    pairs, labelled = load_examples(data, limit=limit)
    if "model" not in model_cache:
        model_cache["model"] = load_model(config.model, dtype=config.dtype, device=config.device)
    model, tokenizer = model_cache["model"]
    pairs, labelled, dropped = drop_too_long(model, tokenizer, pairs, labelled)
    if stats is not None:
        stats["skipped_too_long"] = stats.get("skipped_too_long", 0) + len(dropped)
    rows, labels, pair_index = examples_to_rows(pairs, labelled)
    layers = resolve_layers(model, config.layers)
    feats = extract_features(model, tokenizer, rows, layers, config.pooling, config.batch_tokens, stats=stats)
    keys: dict[str, int] = {}
    groups = torch.tensor([keys.setdefault(prompt_key(p), len(keys)) for p, _ in rows], dtype=torch.long)
    meta = feature_metadata(model, tokenizer, layers, config.pooling)
    return FeatureSet(feats, labels, pair_index, meta), groups


def drop_too_long(model, tokenizer, pairs: list, labelled: list) -> tuple[list, list, list[str]]:
    """Pairs and labelled rows that fit the model's context window, and the sources of those that do not.

    Hidden states past the context window are not what the model computes on real input; a probe trained on
    them learns noise.
    """
    import logging

    from .features import context_length, rendered_lengths

    limit = context_length(model)
    if limit is None:
        return pairs, labelled, []
    pair_lengths = rendered_lengths(tokenizer, [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)])
    long_pair = [max(pair_lengths[2 * i:2 * i + 2]) > limit for i in range(len(pairs))]
    long_item = [n > limit for n in rendered_lengths(tokenizer, [(x.prompt, x.response) for x in labelled])]
    dropped = [x.source for x, bad in zip(pairs, long_pair) if bad] + [x.source for x, bad in zip(labelled, long_item)
                                                                       if bad]
    if dropped:
        logging.getLogger(__name__).warning(
            "skipping %d example(s) longer than the model's context of %d tokens: %s%s", len(dropped), limit,
            ", ".join(dropped[:5]), " ..." if len(dropped) > 5 else "")
    return ([x for x, bad in zip(pairs, long_pair) if not bad], [x for x, bad in zip(labelled, long_item) if not bad],
            dropped)


def _load_feature_file(path: str):
    from .features import load_features

    fs = load_features(path)
    groups = None
    if "groups" in fs.metadata:
        groups = torch.tensor(fs.metadata["groups"], dtype=torch.long)
    return fs, groups


def run_probe_train(config: ProbeTrainConfig, stats: dict | None = None) -> dict:
    """Train, test, save; returns the metrics. `stats` receives the tokens run through the model (compute)."""
    from .data import write_json
    from .features import save_features

    if bool(config.data) == bool(config.features):
        raise SystemExit("rbrm probe train: give exactly one of --data or --features")
    model_cache: dict = {}
    stats = {} if stats is None else stats
    if config.features:
        fs, groups = _load_feature_file(config.features)
    else:
        fs, groups = _features_for(config, config.data, config.limit, model_cache, stats)
        if config.features_out:
            save_features(config.features_out, fs.features, {**fs.metadata, "groups": groups.tolist()},
                          fs.labels, fs.pair_index)
    settings = TrainSettings(config.epochs, config.lr, config.weight_decay, config.batch_size, config.margin,
                             config.layer_loss_weight, config.patience, config.val_fraction, config.seed)
    meta = fs.metadata
    probe_config = {"model": meta.get("model"), "layers": meta.get("layers"),
                    "pooling": meta.get("pooling", config.pooling), "end_of_turn": meta.get("end_of_turn"),
                    "train_source": config.data or config.features, "model_name": config.model_name}
    model, metrics = train_reward_model(fs.features, fs.pair_index, fs.labels, settings, groups, probe_config)
    if config.baseline:
        generator = torch.Generator().manual_seed(settings.seed)
        train_rows, _ = _split(fs.features.shape[0], row_groups(fs.features.shape[0], fs.pair_index, groups),
                               settings.val_fraction, generator)
        train_mask = torch.zeros(fs.features.shape[0], dtype=torch.bool)
        train_mask[train_rows] = True
        labels = fs.labels if fs.labels is not None else torch.full((fs.features.shape[0],), -1)
        metrics.update(logistic_baseline(fs.features, fs.pair_index, labels, train_mask, settings.seed))
        layers = meta.get("layers") or list(range(1, fs.features.shape[1] + 1))
        metrics["baseline_layer"] = layers[metrics.pop("baseline_layer_index")]
    if "skipped_too_long" in stats:
        metrics["skipped_too_long"] = stats["skipped_too_long"]
    if config.cv:
        metrics.update(cross_validate(fs.features, fs.pair_index, fs.labels, settings, config.cv, groups))
    if config.test_data or config.test_features:
        if config.test_features:
            test_fs, _ = _load_feature_file(config.test_features)
        else:
            test_fs, _ = _features_for(config, config.test_data, config.test_limit, model_cache)
        lab_rows = torch.nonzero(test_fs.labels >= 0).flatten() if test_fs.labels is not None else None
        test = evaluate(model, test_fs.features, test_fs.pair_index, lab_rows,
                        test_fs.labels[lab_rows] if lab_rows is not None else None)
        metrics.update({f"test_{k}": v for k, v in test.items()})
    if "model" in model_cache:
        model.check_model(model_cache["model"][0])
    model.config["train_metrics"] = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    model.save(config.out)
    if config.metrics_out:
        write_json(config.metrics_out, metrics)
    _print_metrics(metrics, config.out)
    return metrics


def _print_metrics(metrics: dict, out: str) -> None:
    print(f"saved hybrid reward model to {out}")
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:<28} {value:.4f}")
        elif isinstance(value, int):
            print(f"  {key:<28} {value}")
    per_layer = metrics.get("val_per_layer_accuracy")
    if per_layer:
        print("  per-layer val accuracy      " + " ".join(f"{a:.2f}" for a in per_layer))
    gate = metrics.get("val_gate_weights")
    if gate:
        print("  gate weights (val mean)     " + " ".join(f"{g:.2f}" for g in gate))
