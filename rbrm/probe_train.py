"""`rbrm probe train`: a probe-training run from data to the saved hybrid reward model; `train_probe` is the same
fit on a loaded model and in-memory examples.

Features of the policy's own hidden states (`features.py`), the fit (`reward_model.py`), then what says whether
to trust it: the held-out split, K-fold cross-validation, scikit-learn's best-single-layer baseline, a test set,
and the scale calibrated on the policy's labelled answers.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import ThreadpoolController

from .distributed import is_main
from .errors import ConfigError
from .feature_files import FeatureSet, load_features, save_features
from .features import (
    POOLINGS,
    context_length,
    examples_to_rows,
    extract_features,
    feature_metadata,
    rendered_lengths,
    resolve_layers,
)
from .files import write_json
from .formats import LabelledResponse, PreferencePair, load_examples
from .models import DEFAULT_MODEL, load_model
from .render import prompt_key
from .reward_model import (
    FITS,
    GATES,
    HybridRewardModel,
    RewardTrainConfig,
    primary_metric,
    probe_metrics,
    recalibrate,
    row_groups,
    train_reward_model,
    train_val_split,
)

# ------------------------------------------------------------------------------ validation and the baseline


def cross_validate(features, pairs, labels, settings: RewardTrainConfig, k: int, groups=None,
                   baseline: bool = True) -> dict:
    """K-fold accuracy of the hybrid, and of the best-single-layer baseline on the same folds.

    Each fold is held out once; the hybrid's own choices (penalties, gate, early stopping) use the other folds.
    """
    n_rows = features.shape[0]
    row_group = row_groups(n_rows, pairs, groups)
    unique = torch.unique(row_group)
    unique = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(settings.seed))]
    folds = torch.chunk(unique, k)
    all_labels = labels if labels is not None else torch.full((n_rows,), -1, dtype=torch.long)
    scores, baseline_scores = [], []
    for i, fold in enumerate(folds):
        held = torch.isin(row_group, fold)
        keep_pairs = pairs[~held[pairs[:, 0]]] if pairs is not None else None
        test_pairs = pairs[held[pairs[:, 0]]] if pairs is not None else None
        train_labels = torch.where(held, -1, all_labels)
        test_labels = torch.where(held, all_labels, -1)
        model, _ = train_reward_model(features, keep_pairs, train_labels, settings, groups, progress=False)
        lab_rows = torch.nonzero(test_labels >= 0).flatten()
        result = probe_metrics(model, features, test_pairs, lab_rows, test_labels[lab_rows])
        scores.append(primary_metric(result))
        line = f"fold {i + 1}/{k}: hybrid {scores[-1]:.3f}"
        if baseline:
            baseline_scores.append(logistic_baseline(features, pairs, all_labels, ~held)["baseline_val_accuracy"])
            line += f", best-layer logistic regression {baseline_scores[-1]:.3f}"
        print(line)
    result = {"cv_accuracy": _mean(scores), "cv_std": _std(scores), "cv_folds": scores}
    if baseline:
        result.update({"baseline_cv_accuracy": _mean(baseline_scores), "baseline_cv_std": _std(baseline_scores),
                       "baseline_cv_folds": baseline_scores})
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    mean = _mean(values)
    return (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


BASELINE_C = 0.1  # the baseline's L2 strength (scikit-learn's C) and its inner folds on the train side
BASELINE_FOLDS = 3
BASELINE_FITS = ("span", "full")


class SpanLogistic:
    """StandardScaler + L2 logistic regression, fitted in the span of the scaled training rows.

    The L2-penalised solution lies in that span (representer theorem), so the same problem is solved on the rows'
    coordinates in an orthonormal basis of it: n <= ~600 columns instead of a 7B model's 4,096, the same
    objective (scaled first, so the penalty is the same) and the same optimum up to solver tolerance. The scaling
    is StandardScaler's (variance around the mean, also when not centring; its rule for constant features),
    computed in float64 from the distinct rows.
    """

    def __init__(self, paired: bool, C: float = BASELINE_C, tol: float = 1e-4):
        self.paired, self.C, self.tol = paired, C, tol

    def fit(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None,
            signs: np.ndarray | None = None) -> SpanLogistic:
        """Fit on the design `signs[:, None] * x[rows]` (default: `x` itself). Pair differences come as d and -d:
        given once in `x`, their products are computed once (no centring in the paired case, so signs commute)."""
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        signs = np.ones(len(rows)) if signs is None else np.asarray(signs, dtype=np.float64)
        distinct, position = np.unique(rows, return_inverse=True)
        if not self.paired and (len(distinct) < len(rows) or (signs != 1).any()):
            raise ValueError("repeated or negated rows need an uncentred (paired) fit")  # a caller's bug
        unique = np.asarray(x[distinct], dtype=np.float64)
        n = len(rows)
        mean = np.bincount(position, weights=signs, minlength=len(distinct)) @ unique / n
        var = np.maximum(np.bincount(position, minlength=len(distinct)) @ (unique * unique) / n - mean * mean, 0)
        eps = np.finfo(np.float64).eps  # StandardScaler's constant features keep a scale of 1
        self.scale_ = np.where(var <= n * eps * var + (n * mean * eps) ** 2, 1.0, np.sqrt(var))
        self.mean_ = np.zeros_like(mean) if self.paired else mean
        scaled = (unique - self.mean_) / self.scale_
        coords = span_coordinates(scaled @ scaled.T)
        fit = LogisticRegression(C=self.C, max_iter=2000, tol=self.tol, fit_intercept=not self.paired).fit(
            coords[position] * signs[:, None], y)
        # back to the model's dimensions: w = X^T Z (Z^T Z)^-1 beta
        coef = scaled.T @ (coords @ scipy.linalg.solve(coords.T @ coords, fit.coef_.ravel(), assume_a="pos"))
        self.classes_ = fit.classes_
        # the scaling folded into the weights: a margin is one product with the raw rows
        self.weights_ = coef / self.scale_
        self.intercept_ = (float(fit.intercept_[0]) if not self.paired else 0.0) - float(self.mean_ @ self.weights_)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        margin = x @ self.weights_ + self.intercept_
        return self.classes_[(margin > 0).astype(int)]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == y).mean())


def span_coordinates(gram: np.ndarray) -> np.ndarray:
    """Z with Z Z^T = K for the Gram matrix K = X X^T of n rows: the rows' coordinates in an orthonormal basis
    of their span (X^T Z (Z^T Z)^-1). From a pivoted Cholesky factor (n^3/3), which stops at the rows' rank
    (n - 1 for centred rows)."""
    factor, pivots, rank, _ = scipy.linalg.lapack.dpstrf(gram, lower=1, tol=1e-10 * float(np.max(np.diag(gram))))
    coords = np.zeros((len(gram), rank))
    coords[pivots - 1] = np.tril(factor)[:, :rank]
    return coords


def logistic_baseline(features, pairs, labels, train_mask_rows: torch.Tensor, seed: int = 0,
                      fit: str = "span") -> dict:
    """scikit-learn logistic regression on the best single layer (chosen by CV on the train side).

    `fit`: `span` fits each layer in the span of its training rows (`SpanLogistic`, seconds for a 7B model's 32
    layers); `full` in all the model's dimensions, the former path (the same accuracies up to solver tolerance,
    11-16x slower at 4,096 dims on 2 cores: benchmarks/bench_probe_cv.py).
    """
    if fit not in BASELINE_FITS:
        raise ConfigError(f"baseline fit {fit!r}: expected one of {', '.join(BASELINE_FITS)}")
    paired = pairs is not None and len(pairs) > 0

    def design(layer: int, rows_mask: torch.Tensor):
        x = features[:, layer].float()  # differences in float32, as the full fit always took them
        if paired:
            p = pairs[rows_mask[pairs[:, 0]]]
            diff = (x[p[:, 0]] - x[p[:, 1]]).numpy()
            return np.concatenate([diff, -diff]), np.concatenate([np.ones(len(p)), np.zeros(len(p))])
        rows = torch.nonzero(rows_mask & (labels >= 0)).flatten()
        return x[rows].numpy(), labels[rows].numpy()

    def classifier():  # pair differences have no offset: no centring, no intercept
        if fit == "span":
            return SpanLogistic(paired)
        return make_pipeline(StandardScaler(with_mean=not paired),
                             LogisticRegression(C=BASELINE_C, max_iter=2000, fit_intercept=not paired))

    def fitted(x, y, train):
        """The classifier fitted on `x[train]`; a span fit of pair differences gets each difference once."""
        if fit == "span" and paired:
            half = len(x) // 2  # x = [d; -d]
            return classifier().fit(x[:half], y[train], train % half, np.where(train < half, 1.0, -1.0))
        return classifier().fit(x[train], y[train])

    def layer_cv(layer: int) -> float:
        x, y = design(layer, train_mask_rows)
        # the folds cross_val_score(cv=3) takes for a classifier
        return float(np.mean([fitted(x, y, train).score(x[test], y[test])
                              for train, test in StratifiedKFold(BASELINE_FOLDS).split(x, y)]))

    layers = range(features.shape[1])
    if fit == "span":
        # Layers side by side on torch's threads, each on one BLAS thread: a span fit is n x n work whose BLAS
        # threads mostly wait on each other (on 2 shared cores a 480-row Gram matrix took 5x longer on two).
        with ThreadpoolController().limit(limits=1, user_api="blas"), \
                ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            cvs = list(pool.map(layer_cv, layers))
            x_train, y_train = design(int(np.argmax(cvs)), train_mask_rows)
            clf = fitted(x_train, y_train, np.arange(len(y_train)))
    else:
        cvs = [layer_cv(layer) for layer in layers]
        x_train, y_train = design(int(np.argmax(cvs)), train_mask_rows)
        clf = fitted(x_train, y_train, np.arange(len(y_train)))
    best_layer, best_cv = int(np.argmax(cvs)), cvs[int(np.argmax(cvs))]  # the first of equals, as before
    x_test, y_test = design(best_layer, ~train_mask_rows)
    accuracy = float((clf.predict(x_test) == y_test).mean()) if len(y_test) else float("nan")
    return {"baseline_layer_index": best_layer, "baseline_train_cv_accuracy": float(best_cv),
            "baseline_val_accuracy": accuracy}


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class ProbeTrainConfig:
    out: str = field(metadata={"help": "output directory for the reward model"})
    data: str | None = field(default=None, metadata={"help": "pairs or labelled responses (needs --model)"})
    features: str | None = field(default=None, metadata={"help": "a features .safetensors file instead of --data"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model whose hidden states are used"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N pairs/rows of --data"})
    test_data: str | None = field(default=None, metadata={"help": "another data set to test on (needs --model)"})
    test_features: str | None = field(default=None, metadata={"help": "another features file to test on"})
    test_limit: int | None = field(default=None, metadata={"help": "use only the first N rows of --test-data"})
    calibration_data: str | None = field(default=None, metadata={
        "help": "labelled answers of the policy itself (e.g. data/rbrm_labels/smollm2_dev.jsonl for SmolLM2) to "
                "calibrate the reward scale on, instead of the probe's own cross-fitted rewards: the confidence "
                "is applied to the policy's answers, which the probe data may separate far more easily"})
    layers: list[int] | None = field(default=None, metadata={"help": "1-based layers (default: all)"})
    pooling: str = field(default="last", metadata={"help": "last (end-of-turn token) or mean"})
    dtype: str = field(default="auto", metadata={"help": "dtype of the model forward"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda"})
    batch_tokens: int = field(default=4096, metadata={"help": "at most this many padded tokens per forward"})
    features_out: str | None = field(default=None, metadata={"help": "also save the computed features here"})
    fit: str = field(default="staged", metadata={"help": "staged (penalised probes chosen by cross-validation, then "
                                                          "the gate on their out-of-fold scores) or joint (the "
                                                          "paper's: AdamW on everything)"})
    gate: str = field(default="vote_bias", metadata={"help": "vote_bias (g = sigmoid(V s + c)), vote (the paper's "
                                                             "g = sigmoid(V s)) or mean (g = 1/2: no gate)"})
    inner_folds: int = field(default=3, metadata={"help": "staged fit: cross-validation folds on the train side"})
    epochs: int = field(default=300, metadata={"help": "joint fit: epochs (and lr ... patience below)"})
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    margin: float = field(default=1.0, metadata={"help": "joint fit: pairwise margin m"})
    layer_loss_weight: float = field(default=1.0, metadata={"help": "joint fit: weight of each probe's own loss"})
    patience: int = field(default=25, metadata={"help": "joint fit: early-stopping patience in epochs"})
    val_fraction: float = 0.2
    seed: int = 0
    cv: int = field(default=0, metadata={"help": "K for K-fold cross-validated accuracy (0: off)"})
    baseline: bool = field(default=True, metadata={"help": "also fit the sklearn best-single-layer baseline"})
    metrics_out: str | None = field(default=None, metadata={"help": "write metrics JSON here"})
    model_name: str | None = field(default=None, metadata={"help": "a label recorded in the saved config"})

    def __post_init__(self):
        """The choices, checked before any feature is extracted (and by the pipeline before stage 1)."""
        for name, choices in (("pooling", POOLINGS), ("fit", FITS), ("gate", GATES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(choices)}")


def _features_for(config: ProbeTrainConfig, data: str, limit: int | None, model_cache: dict,
                  stats: dict | None = None):
    """Compute (FeatureSet, groups) for a data file with the configured model."""
    pairs, labelled = load_examples(data, limit=limit)
    if "model" not in model_cache:
        model_cache["model"] = load_model(config.model, dtype=config.dtype, device=config.device)
    model, tokenizer = model_cache["model"]
    return probe_features(model, tokenizer, pairs, labelled, config.layers, config.pooling, config.batch_tokens,
                          stats)


def probe_features(model, tokenizer, pairs: list[PreferencePair], labelled: list[LabelledResponse],
                   layers: list[int] | None = None, pooling: str = "last", batch_tokens: int = 4096,
                   stats: dict | None = None) -> tuple[FeatureSet, torch.Tensor]:
    """(FeatureSet, prompt group of every row) of in-memory examples: what a probe trains on.

    Examples longer than the context window are dropped (counted in `stats["skipped_too_long"]`); groups keep a
    prompt's rows on one side of every split."""
    pairs, labelled, dropped = drop_too_long(model, tokenizer, pairs, labelled)
    if stats is not None:
        stats["skipped_too_long"] = stats.get("skipped_too_long", 0) + len(dropped)
    rows, labels, pair_index = examples_to_rows(pairs, labelled)
    layers = resolve_layers(model, layers)
    feats = extract_features(model, tokenizer, rows, layers, pooling, batch_tokens, stats=stats)
    keys: dict[str, int] = {}
    groups = torch.tensor([keys.setdefault(prompt_key(p), len(keys)) for p, _ in rows], dtype=torch.long)
    meta = feature_metadata(model, tokenizer, layers, pooling)
    return FeatureSet(feats, labels, pair_index, meta), groups


def _probe_config(meta: dict, pooling: str, source: str | None, model_name: str | None) -> dict:
    """What a saved probe records about the model and features it was trained on (checked when it is applied)."""
    return {"model": meta.get("model"), "layers": meta.get("layers"), "pooling": meta.get("pooling", pooling),
            "end_of_turn": meta.get("end_of_turn"), "train_source": source, "model_name": model_name}


def train_probe(model, tokenizer, pairs=(), labelled=(), *, layers: list[int] | None = None, pooling: str = "last",
                settings: RewardTrainConfig | None = None, batch_tokens: int = 4096,
                model_name: str | None = None) -> tuple[HybridRewardModel, dict]:
    """Fit the hybrid reward on a loaded model's hidden states: `rbrm probe train` without files.

    `pairs` are `PreferencePair`s or (prompt, chosen, rejected) tuples; `labelled` are `LabelledResponse`s or
    (prompt, response, safe) tuples. Returns the probe (checked against `model`) and its held-out metrics.
    """
    pairs = [p if isinstance(p, PreferencePair) else PreferencePair(*p, source=f"pairs[{i}]")
             for i, p in enumerate(pairs)]
    labelled = [x if isinstance(x, LabelledResponse) else LabelledResponse(*x, source=f"labelled[{i}]")
                for i, x in enumerate(labelled)]
    if not pairs and not labelled:
        raise ConfigError("train_probe needs preference pairs or safety-labelled responses")
    fs, groups = probe_features(model, tokenizer, pairs, labelled, layers, pooling, batch_tokens)
    probe, metrics = train_reward_model(fs.features, fs.pair_index, fs.labels, settings or RewardTrainConfig(), groups,
                                        _probe_config(fs.metadata, pooling, "in memory", model_name))
    probe.check_model(model, tokenizer)
    probe.config["train_metrics"] = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    return probe, metrics


def drop_too_long(model, tokenizer, pairs: list, labelled: list) -> tuple[list, list, list[str]]:
    """Pairs and labelled rows that fit the model's context window, and the sources of those that do not.

    Hidden states past the context window are not what the model computes on real input; a probe trained on
    them learns noise.
    """
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
    fs = load_features(path)
    groups = None
    if "groups" in fs.metadata:
        groups = torch.tensor(fs.metadata["groups"], dtype=torch.long)
    return fs, groups


def run_probe_train(config: ProbeTrainConfig, stats: dict | None = None) -> dict:
    """Train, test, save; returns the metrics. `stats` receives the tokens run through the model (compute)."""
    if bool(config.data) == bool(config.features):
        raise ConfigError("give exactly one of --data or --features")
    model_cache: dict = {}
    stats = {} if stats is None else stats
    if config.features:
        fs, groups = _load_feature_file(config.features)
    else:
        fs, groups = _features_for(config, config.data, config.limit, model_cache, stats)
        if config.features_out and is_main():  # under a launcher the features are every process's (summed)
            save_features(config.features_out, fs.features, {**fs.metadata, "groups": groups.tolist()},
                          fs.labels, fs.pair_index)
    settings = RewardTrainConfig(config.epochs, config.lr, config.weight_decay, config.batch_size, config.margin,
                             config.layer_loss_weight, config.patience, config.val_fraction, config.seed,
                             config.fit, config.gate, config.inner_folds)
    meta = fs.metadata
    probe_config = _probe_config(meta, config.pooling, config.data or config.features, config.model_name)
    model, metrics = train_reward_model(fs.features, fs.pair_index, fs.labels, settings, groups, probe_config)
    if config.baseline:
        generator = torch.Generator().manual_seed(settings.seed)
        train_rows, _ = train_val_split(fs.features.shape[0], row_groups(fs.features.shape[0], fs.pair_index, groups),
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
        metrics.update(cross_validate(fs.features, fs.pair_index, fs.labels, settings, config.cv, groups,
                                      baseline=config.baseline))
    if config.test_data or config.test_features:
        if config.test_features:
            test_fs, _ = _load_feature_file(config.test_features)
        else:
            test_fs, _ = _features_for(config, config.test_data, config.test_limit, model_cache)
        lab_rows = torch.nonzero(test_fs.labels >= 0).flatten() if test_fs.labels is not None else None
        test = probe_metrics(model, test_fs.features, test_fs.pair_index, lab_rows,
                        test_fs.labels[lab_rows] if lab_rows is not None else None)
        metrics.update({f"test_{k}": v for k, v in test.items()})
    if config.calibration_data:
        calibration_fs, _ = _features_for(config, config.calibration_data, None, model_cache)
        metrics.update(recalibrate(model, calibration_fs, config.calibration_data))
    if "model" in model_cache:
        model.check_model(model_cache["model"][0])
    model.config["train_metrics"] = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    if not is_main():  # every process fitted the same probe on the same features; the main one writes it
        return metrics
    model.save(config.out)
    if config.metrics_out:
        write_json(config.metrics_out, metrics)
    _print_metrics(metrics, config.out)
    return metrics


def _print_metrics(metrics: dict, out: str) -> None:
    print(f"saved hybrid reward model to {out}")
    side = [("hybrid", "val_pair_accuracy", "val_accuracy"), ("mean of probes", "val_mean_probe_accuracy", None),
            ("best probe", "val_best_probe_accuracy", None), ("sklearn best layer", "baseline_val_accuracy", None)]
    found = [(name, metrics.get(a, metrics.get(b) if b else None)) for name, a, b in side]
    if any(v is not None for _, v in found):
        print("  held-out accuracy: " + ", ".join(f"{name} {v:.3f}" for name, v in found if v is not None))
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:<28} {value:.4f}")
        elif isinstance(value, int):
            print(f"  {key:<28} {value}")
    per_layer = metrics.get("val_per_layer_accuracy")
    if per_layer:
        print("  per-layer val accuracy      " + " ".join(f"{a:.2f}" for a in per_layer))
    gate = metrics.get("val_gate_share")
    if gate:
        print("  gate share (val mean)       " + " ".join(f"{g:.2f}" for g in gate))
