"""The hybrid reward model: one linear probe per layer, mixed by a learned vote gate (docs/method.md §2).

    s_l = w_l . z_l + b_l,   z_l = (h_l - mean_l) / std_l     (per-layer standardisation, saved with the model)
    g   = sigmoid(V s + c),  V in R^{L x L}, c in R^L      (c = 0 frozen: the paper's `vote`; V = c = 0: `mean`)
    r   = sum_l g_l s_l

Two ways to fit it (`RewardTrainConfig.fit`):
- `staged` (default): each probe is an L2-regularised logistic regression (Bradley-Terry on pairs, logistic on
  labelled rows) whose penalty is chosen per layer by grouped cross-validation on the training side; the gate is
  then fitted on the probes' out-of-fold scores, so it learns how far each layer can be trusted on data the
  probes did not see. Exact, fast, and never worse than choosing one layer by the same cross-validation.
- `joint` (the paper's): every parameter by AdamW on -log sigmoid(r_c - r_r - m) (and/or a logistic loss), plus
  the same loss on each probe's own score (`layer_loss_weight`), early-stopped on the validation split.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError, RbrmError
from .files import atomic_path, file_digest, read_json_file, write_json
from .machine import torch_threads
from .models import model_fingerprint
from .render import end_of_turn

FORMAT_VERSION = 2  # 2 adds the gate bias c; version-1 probes load with c = 0 (the paper's vote gate)
GATES = ("vote_bias", "vote", "mean")  # mean: V and c frozen at 0, every layer weighs 1/2 (an ablation)
FITS = ("staged", "joint")
WEIGHTS_FILE = "reward_model.safetensors"
CONFIG_FILE = "config.json"


class ModelMismatchError(RbrmError, ValueError):
    """A probe was about to be applied to hidden states of a model it was not trained on."""


class HybridRewardModel(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, config: dict | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, hidden_size))  # w_l, one probe per row
        self.bias = nn.Parameter(torch.zeros(num_layers))  # b_l
        self.config = dict(config or {})
        self.gate = nn.Parameter(torch.zeros(num_layers, num_layers), requires_grad=self.gate_kind != "mean")  # V
        # c: a per-layer prior on the vote, so the gate can trust some layers more on every input
        self.gate_bias = nn.Parameter(torch.zeros(num_layers), requires_grad=self.gate_kind == "vote_bias")
        self.register_buffer("feature_mean", torch.zeros(num_layers, hidden_size))
        self.register_buffer("feature_std", torch.ones(num_layers, hidden_size))

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

    @property
    def gate_kind(self) -> str:
        return self.config.get("gate", "vote_bias")

    @property
    def calibration(self) -> dict:
        """{"scale": a, "offset": o}: sigmoid(a (r_c - r_r)) is the probability that the chosen answer is safer."""
        return self.config.get("calibration") or {"scale": 1.0, "offset": 0.0}

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
        # w . (h - mean) / std = h . (w / std) - mean . (w / std): no standardised [B, L, d] copy of the input
        scaled = self.weight / self.feature_std
        offset = self.bias - (self.feature_mean * scaled).sum(-1)
        x = features.to(scaled.dtype)
        if x.is_inference() and torch.is_grad_enabled() and scaled.requires_grad:
            x = x.clone()  # features from inference mode cannot be saved for the probe's backward
        return torch.einsum("bld,ld->bl", x, scaled) + offset

    def gate_weights(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(scores @ self.gate.T + self.gate_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reward r [B] for features [B, L, d]."""
        return self.reward_from_scores(self.layer_scores(features))

    def reward_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return (self.gate_weights(scores) * scores).sum(-1)

    # ----------------------------------------------------------------------------------- persistence

    def save(self, directory: str) -> None:
        """safetensors weights + JSON config, written atomically into `directory`."""
        config = {"end_of_turn": None, **self.config, "layers": self.layers, "pooling": self.pooling,
                  "gate": self.gate_kind, "format_version": FORMAT_VERSION, "num_layers": self.num_layers,
                  "hidden_size": int(self.weight.shape[1])}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(os.path.join(directory, WEIGHTS_FILE)) as tmp:
            save_file(tensors, str(tmp))
            config["weights_sha256"] = file_digest(tmp, None)  # checked on load: flipped bytes must not score silently
        write_json(os.path.join(directory, CONFIG_FILE), config)

    @classmethod
    def load(cls, directory: str, map_location: str | torch.device = "cpu") -> HybridRewardModel:
        config_path = os.path.join(directory, CONFIG_FILE)
        weights_path = os.path.join(directory, WEIGHTS_FILE)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise DataError(path, None, None, f"not found: is {directory} a reward model saved by rbrm?")
        config = read_json_file(config_path)
        if not isinstance(config, dict):
            raise DataError(config_path, None, None, f"expected a JSON object, got {type(config).__name__}")
        _check_probe_config(config, config_path)
        actual = file_digest(weights_path, None)
        if config["weights_sha256"] != actual:
            raise DataError(weights_path, None, None, f"checksum {actual[:16]}… differs from the one in "
                            f"{CONFIG_FILE} ({config['weights_sha256'][:16]}…): the file is corrupt or was "
                            "replaced; retrain or restore it")
        model = cls(config["num_layers"], config["hidden_size"], {"gate": "vote", **config})
        try:
            tensors = load_file(weights_path, device=str(map_location))
            tensors.setdefault("gate_bias", torch.zeros(config["num_layers"]))  # a version-1 probe
            model.load_state_dict(tensors)
        except (RuntimeError, OSError, SafetensorError) as err:  # wrong shapes, or a file it cannot parse
            raise DataError(weights_path, None, None, f"cannot load the probe weights: {err}") from None
        return model

    def check_model(self, model, tokenizer=None) -> None:
        """Refuse a policy whose hidden states this probe cannot read: another architecture, or (with `tokenizer`)
        a chat template that closes responses with another token than the one the probe read in training.

        Same shape but different weights (a fine-tuned descendant, the usual case in DPO) only warns.
        """
        expected = self.config.get("model")
        if expected:
            self._check_recorded_model(expected, model)
        else:
            warnings.warn("this reward model records no base model; it cannot be checked", stacklevel=2)
        if self.weight.shape[1] != model.config.hidden_size:
            raise ModelMismatchError(f"reward model expects hidden size {self.weight.shape[1]}, the model has "
                                     f"{model.config.hidden_size}")
        trained_marker = self.config.get("end_of_turn")
        if tokenizer is not None and trained_marker is not None and trained_marker != end_of_turn(tokenizer):
            raise ModelMismatchError(f"reward model was trained with responses closed by {trained_marker!r}; this "
                                     f"tokenizer's chat template closes them with {end_of_turn(tokenizer)!r}")

    def _check_recorded_model(self, expected: dict, model) -> None:
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
                          f"than {expected.get('name')!r}; fine for a fine-tuned descendant", stacklevel=3)


def _check_probe_config(config: dict, path: str) -> None:
    """Every field a probe needs to be applied as trained; a missing one is an error, never a default."""
    for key, ok, expected in (
            ("num_layers", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            ("hidden_size", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            ("layers", lambda v: isinstance(v, list) and v and all(isinstance(x, int) and x > 0 for x in v),
             "a list of 1-based layer numbers"),
            ("pooling", lambda v: v in ("last", "mean"), "'last' or 'mean'"),
            ("gate", lambda v: v in GATES, " or ".join(map(repr, GATES))),
            ("end_of_turn", lambda v: v is None or isinstance(v, str), "the end-of-turn text or null"),
            ("weights_sha256", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest")):
        if key not in config:
            if key == "gate" and config.get("format_version", 1) < 2:
                continue  # written before the gate bias existed: the paper's vote gate
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
class RewardTrainConfig:
    epochs: int = 300  # joint fit only, like lr ... patience
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    margin: float = 1.0
    layer_loss_weight: float = 1.0
    patience: int = 25
    val_fraction: float = 0.2
    seed: int = 0
    fit: str = "staged"
    gate: str = "vote_bias"
    inner_folds: int = 3  # staged fit: folds that choose each probe's penalty and give the gate its scores


# L2 strengths tried for each probe, in units of the mean loss (sklearn's C = 1 / (penalty * rows)), and for the
# gate. Wide on purpose: 576- and 4096-wide hidden states with a few hundred rows need very different ones.
PROBE_PENALTIES = tuple(10.0 ** k for k in range(-4, 3))
GATE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)


def row_groups(n_rows: int, pairs: torch.Tensor | None, groups: torch.Tensor | None) -> torch.Tensor:
    """Group id per row: the given prompt groups, else each pair's two rows together, else each row alone."""
    if groups is not None:
        return groups
    result = torch.arange(n_rows)
    if pairs is not None and len(pairs):
        result[pairs[:, 1]] = result[pairs[:, 0]]
    return result


def train_val_split(n: int, groups: torch.Tensor | None, fraction: float, generator: torch.Generator):
    """Random train/val split of n items; items of one group (same prompt) stay on one side.

    sklearn's `GroupShuffleSplit` draws the same kind of split from another random stream; this one draws from
    the generator that seeds the rest of the fit, and switching would redraw every shipped and reported probe.
    """
    if groups is None:
        groups = torch.arange(n)
    unique = torch.unique(groups)
    order = unique[torch.randperm(len(unique), generator=generator)]
    n_val = max(1, int(round(len(unique) * fraction))) if fraction > 0 else 0
    val_groups = order[:n_val]
    is_val = torch.isin(groups, val_groups)
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def _losses(model: HybridRewardModel, features, pairs, labelled_rows, labels, settings: RewardTrainConfig):
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


def _rows_of(pairs: torch.Tensor | None, labelled_rows: torch.Tensor | None) -> torch.Tensor:
    parts = [t.flatten() for t in (pairs, labelled_rows) if t is not None and len(t)]
    return torch.unique(torch.cat(parts)) if parts else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def probe_metrics(model: HybridRewardModel, features: torch.Tensor, pairs: torch.Tensor | None = None,
             labelled_rows: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict:
    """Pair accuracy (r_c > r_r), hard accuracy, labelled accuracy, per-layer accuracy, the uniform mean of the
    probes, gate weights; only the rows that the pairs and labelled rows name are scored."""
    model.eval()
    metrics: dict = {}
    rows = _rows_of(pairs, labelled_rows)
    position = torch.full((features.shape[0],), -1, dtype=torch.long)
    position[rows] = torch.arange(len(rows))
    scores = model.layer_scores(features[rows])
    reward = model.reward_from_scores(scores)
    mean_probe = scores.mean(-1)
    gate = model.gate_weights(scores)
    metrics["gate_weights"] = gate.mean(0).tolist()
    metrics["gate_share"] = (gate / gate.sum(-1, keepdim=True)).mean(0).tolist()  # how the vote is split
    if pairs is not None and len(pairs):
        c, r = position[pairs[:, 0]], position[pairs[:, 1]]
        metrics["pair_accuracy"] = (reward[c] > reward[r]).float().mean().item()
        metrics["hard_accuracy"] = torch.cat([reward[c] >= 0, reward[r] <= 0]).float().mean().item()
        metrics["mean_probe_accuracy"] = (mean_probe[c] > mean_probe[r]).float().mean().item()
        metrics["per_layer_accuracy"] = (scores[c] > scores[r]).float().mean(0).tolist()
        metrics["n_pairs"] = len(pairs)
    if labelled_rows is not None and len(labelled_rows):
        truth = labels.bool()
        at = position[labelled_rows]
        metrics["accuracy"] = ((reward[at] > 0) == truth).float().mean().item()
        metrics.setdefault("mean_probe_accuracy", ((mean_probe[at] > 0) == truth).float().mean().item())
        per_layer = ((scores[at] > 0) == truth[:, None]).float().mean(0).tolist()
        metrics.setdefault("per_layer_accuracy", per_layer)
        metrics["per_layer_labelled_accuracy"] = per_layer
        metrics["n_labelled"] = len(labelled_rows)
    return metrics


def primary_metric(metrics: dict) -> float:
    return metrics.get("pair_accuracy", metrics.get("accuracy", float("nan")))


def train_reward_model(features: torch.Tensor, pairs: torch.Tensor | None, labels: torch.Tensor | None,
                       settings: RewardTrainConfig, groups: torch.Tensor | None = None, config: dict | None = None,
                       progress: bool = True) -> tuple[HybridRewardModel, dict]:
    """Fit on a train split and report on a validation split (split by prompt group when known).

    labels: [N] with 1 = safe, 0 = unsafe, -1 = unknown (rows that only appear in pairs). The validation split
    chooses nothing in the staged fit; the joint fit early-stops on it.
    """
    if settings.fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {settings.fit!r}")
    if settings.gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {settings.gate!r}")
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    n_rows = features.shape[0]
    labels = labels if labels is not None else torch.full((n_rows,), -1, dtype=torch.long)
    labelled_all = torch.nonzero(labels >= 0).flatten()
    pairs = pairs if pairs is not None else torch.empty(0, 2, dtype=torch.long)
    if not len(pairs) and not len(labelled_all):
        raise ValueError("nothing to train on: no pairs and no labelled rows")
    row_group = row_groups(n_rows, pairs, groups)
    # Split pairs and labelled rows with one row-level decision, so a prompt never sits on both sides.
    train_rows, val_rows = train_val_split(n_rows, row_group, settings.val_fraction, generator)
    is_val = torch.zeros(n_rows, dtype=torch.bool)
    is_val[val_rows] = True
    train_pairs, val_pairs = pairs[~is_val[pairs[:, 0]]], pairs[is_val[pairs[:, 0]]]
    train_lab, val_lab = labelled_all[~is_val[labelled_all]], labelled_all[is_val[labelled_all]]
    model = HybridRewardModel(features.shape[1], features.shape[2], {**(config or {}), "gate": settings.gate})
    model.fit_standardizer(features[_rows_of(train_pairs, train_lab)])
    if settings.fit == "staged":
        info = _fit_staged(model, features, train_pairs, train_lab, labels, row_group, settings, progress)
    else:
        info = _fit_joint(model, features, train_pairs, val_pairs, train_lab, val_lab, labels, settings, generator,
                          progress)
    model.config["calibration"] = info.pop("calibration")
    metrics = {"fit": settings.fit, "gate": settings.gate, **info, "calibration_scale": model.calibration["scale"],
               "calibration_offset": model.calibration["offset"],
               "n_train_pairs": len(train_pairs), "n_val_pairs": len(val_pairs),
               "n_train_labelled": len(train_lab), "n_val_labelled": len(val_lab)}
    if len(val_pairs) + len(val_lab):
        val = probe_metrics(model, features, val_pairs, val_lab, labels[val_lab])
        metrics.update({f"val_{k}": v for k, v in val.items()})
        metrics["per_layer_accuracy"] = val.get("per_layer_accuracy")
        metrics["val_best_probe_accuracy"] = val["per_layer_accuracy"][info["best_probe_index"]]
        metrics.update({f"val_{k}": v for k, v in calibration_report(model, features, val_pairs, val_lab,
                                                                       labels[val_lab]).items()})
    metrics["settings"] = asdict(settings)
    model.config["train_metrics"] = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    return model, metrics


# ------------------------------------------------------------------------------ the staged fit


def _data_loss(scores: torch.Tensor, pairs: torch.Tensor, rows: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Mean Bradley-Terry loss on pairs plus mean logistic loss on labelled rows, over the last axis of `scores`."""
    total = scores.new_zeros(scores.shape[:-1])
    if len(pairs):
        total = total + F.softplus(scores[..., pairs[:, 1]] - scores[..., pairs[:, 0]]).mean(-1)
    if len(rows):
        s = scores[..., rows]
        total = total + F.binary_cross_entropy_with_logits(s, safe.to(s.dtype).expand_as(s), reduction="none").mean(-1)
    return total


def _accuracy(scores: torch.Tensor, pairs: torch.Tensor, rows: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    if len(pairs):
        return (scores[..., pairs[:, 0]] > scores[..., pairs[:, 1]]).double().mean(-1)
    return ((scores[..., rows] > 0) == safe.bool()).double().mean(-1)


def _minimise(params: list[torch.Tensor], objective, max_iter: int = 100) -> None:
    """Full-batch L-BFGS with a strong-Wolfe line search: the problems here are convex (the probes) or small."""
    # float32 resolves a loss change of about 1e-6 on these sums of per-layer losses: stop there, not later
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-5,
                                  tolerance_change=1e-6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch_threads(1):  # [L, n]-sized steps
        optimizer.step(closure)


def _row_space(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z [L, n, d] -> (x [L, n, k], m [L, n, k]) with x x^T = z z^T and k = min(n, d).

    A penalised linear probe's weights lie in the span of its training rows (representer theorem), so fitting
    on x and mapping back with w = z^T (m beta) gives the same probe as fitting on z, at a width of n instead of
    d: a 4096-wide 7B layer with 500 rows costs a 500-wide fit. m is None when d <= n (x is z).
    """
    if z.shape[2] <= z.shape[1]:
        return z, None
    gram = torch.bmm(z, z.transpose(1, 2)).double()  # float64: a small matrix
    with torch_threads(1):
        eigval, eigvec = torch.linalg.eigh(gram)
    keep = eigval > eigval[:, -1:].clamp_min(1e-30) * 1e-9  # drop the null space (centering removes a direction)
    root = eigval.clamp_min(1e-30).sqrt() * keep
    inverse = torch.where(keep, 1 / root.clamp_min(1e-30), 0)
    return (eigvec * root[:, None, :]).to(z.dtype), (eigvec * inverse[:, None, :]).to(z.dtype)


def _fit_probes(x: torch.Tensor, pairs, rows, safe, penalty: torch.Tensor,
                init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's penalised logistic probe at once: x [L, n, k], penalty [L] -> (beta [L, k], b [L])."""
    beta = (init[0] if init else x.new_zeros(x.shape[0], x.shape[2])).clone().requires_grad_(True)
    bias = (init[1] if init else x.new_zeros(x.shape[0])).clone().requires_grad_(True)

    def objective():
        scores = _probe_scores(x, (beta, bias))
        return (_data_loss(scores, pairs, rows, safe) + 0.5 * penalty * (beta * beta).sum(-1)).sum()

    _minimise([beta, bias], objective)
    return beta.detach(), bias.detach()


def _probe_scores(x: torch.Tensor, fitted: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[L, n] scores; beta [1, k] @ x^T [k, n] per layer runs 3x faster here than x @ beta [k, 1] (baddbmm)."""
    return (fitted[0][:, None, :] @ x.transpose(1, 2)).squeeze(1) + fitted[1][:, None]


def _gate_prior(num_layers: int) -> float:
    """The gate bias at which every layer gets 1/L of the vote: r starts as the probes' mean."""
    return -math.log(num_layers - 1) if num_layers > 1 else 0.0


def _fit_gate(scores: torch.Tensor, pairs, rows, safe, gate: str, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """V and c on out-of-fold probe scores [n, L], penalised towards the uniform vote (V = 0, c at the prior)."""
    num_layers = scores.shape[1]
    prior = _gate_prior(num_layers) if gate == "vote_bias" else 0.0
    v = scores.new_zeros(num_layers, num_layers, requires_grad=gate != "mean")
    if gate == "mean":
        return v, scores.new_zeros(num_layers)
    c = torch.full((num_layers,), prior, dtype=scores.dtype, requires_grad=gate == "vote_bias")

    def objective():
        reward = (torch.sigmoid(scores @ v.T + c) * scores).sum(-1)
        return _data_loss(reward, pairs, rows, safe) + 0.5 * penalty * ((v * v).sum() + ((c - prior) ** 2).sum())

    _minimise([v, c] if gate == "vote_bias" else [v], objective)
    return v.detach(), c.detach()


def _gate_reward(scores: torch.Tensor, fitted: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (torch.sigmoid(scores @ fitted[0].T + fitted[1]) * scores).sum(-1)


def _fold_of_rows(groups: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, int]:
    k = min(k, len(torch.unique(groups)))
    fold = torch.full((len(groups),), -1, dtype=torch.long)
    if k < 2:
        return fold, 0
    for i, (_, held) in enumerate(GroupKFold(k, shuffle=True, random_state=seed).split(groups, groups=groups)):
        fold[torch.as_tensor(held)] = i
    return fold, k


def _side(held: torch.Tensor, pairs, rows, safe, inside: bool):
    """The pairs and labelled rows inside a held-out fold (`held`, a row mask), or outside it."""
    p = pairs[held[pairs[:, 0]] == inside] if len(pairs) else pairs
    on = held[rows] == inside if len(rows) else torch.zeros(0, dtype=torch.bool)
    return p, rows[on], safe[on]


def _fit_staged(model: HybridRewardModel, features, pairs, labelled, labels, groups, settings: RewardTrainConfig,
                progress: bool) -> dict:
    """Probes, then the gate on their out-of-fold scores, then the probes again on every training row."""
    rows = _rows_of(pairs, labelled)  # training rows, renumbered 0..n-1 below
    position = torch.full((features.shape[0],), -1, dtype=torch.long)
    position[rows] = torch.arange(len(rows))
    pairs, labelled_at, safe = position[pairs], position[labelled], labels[labelled]
    z = ((features[rows].float() - model.feature_mean) / model.feature_std).transpose(0, 1)
    x, to_weight = _row_space(z.contiguous())
    num_layers = x.shape[0]
    fold, k = _fold_of_rows(groups[rows], settings.inner_folds, settings.seed)
    penalties = torch.tensor(PROBE_PENALTIES, dtype=x.dtype)
    oof = x.new_zeros(len(penalties), num_layers, len(rows))
    bar = tqdm(total=k * len(penalties) + 1, desc="probes", disable=not progress)
    for f in range(k):
        held = fold == f
        fitted = None
        for i in reversed(range(len(penalties))):  # strong to weak, each warm-started from the last
            fitted = _fit_probes(x, *_side(held, pairs, labelled_at, safe, inside=False),
                                 penalties[i].expand(num_layers), fitted)
            oof[i][:, held] = _probe_scores(x, fitted)[:, held]
            bar.update()
    if k:
        choice = torch.stack([_data_loss(o, pairs, labelled_at, safe) for o in oof]).argmin(0)  # per layer
    else:  # one prompt group: nothing to cross-validate
        choice = torch.full((num_layers,), len(penalties) // 2)
    penalty = penalties[choice]
    oof_scores = oof[choice, torch.arange(num_layers)].T  # [n, L]: each layer at its own penalty
    oof_accuracy = _accuracy(oof_scores.T, pairs, labelled_at, safe)
    gate_penalty, gate_cv_loss, calibration = GATE_PENALTIES[-1], None, {"scale": 1.0, "offset": 0.0}
    if k:
        cv_loss, crossfit = [], []
        for mu in GATE_PENALTIES:
            total, reward = 0.0, oof_scores.new_zeros(len(rows))
            for f in range(k):
                held = fold == f
                fitted = _fit_gate(oof_scores, *_side(held, pairs, labelled_at, safe, inside=False), settings.gate, mu)
                reward[held] = _gate_reward(oof_scores, fitted)[held].detach()
                total += _data_loss(reward, *_side(held, pairs, labelled_at, safe, inside=True)).item()
            cv_loss.append(total / k)
            crossfit.append(reward)
        best = min(range(len(cv_loss)), key=cv_loss.__getitem__)
        gate_penalty, gate_cv_loss = GATE_PENALTIES[best], cv_loss[best]
        # rewards in which neither the probes nor the gate saw the row: what the confidence is calibrated on
        calibration = calibrate(crossfit[best], pairs, labelled_at, safe)
    v, c = _fit_gate(oof_scores, pairs, labelled_at, safe, settings.gate, gate_penalty)
    beta, bias = _fit_probes(x, pairs, labelled_at, safe, penalty)
    bar.update()
    bar.close()
    weight = torch.bmm(z.transpose(1, 2), torch.bmm(to_weight, beta[:, :, None])).squeeze(-1) if to_weight is not None \
        else beta
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
        model.gate.copy_(v)
        model.gate_bias.copy_(c)
    return {"best_probe_index": int(oof_accuracy.argmax()), "probe_penalties": penalty.tolist(),
            "oof_per_layer_accuracy": oof_accuracy.tolist(),
            "oof_gate_accuracy": _accuracy(_gate_reward(oof_scores, (v, c)), pairs, labelled_at, safe).item(),
            "gate_penalty": gate_penalty, "gate_cv_loss": gate_cv_loss, "inner_folds": k,
            "calibration": {**calibration, "fitted_on": "cross-fitted training rewards"}}


# ------------------------------------------------------------------------------ the joint fit


def _fit_joint(model: HybridRewardModel, features, train_pairs, val_pairs, train_lab, val_lab, labels,
               settings: RewardTrainConfig, generator: torch.Generator, progress: bool) -> dict:
    """AdamW on every parameter at once (the paper's recipe), early-stopped on the validation split."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
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
            loss = _losses(model, features, batch_p, batch_l, labels[batch_l], settings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if not has_val:
            best_state, best_epoch = {k: v.clone() for k, v in model.state_dict().items()}, epoch
            continue
        model.eval()
        with torch.no_grad():
            val_loss = _losses(model, features, val_pairs, val_lab, labels[val_lab], settings).item()
        metric = primary_metric(probe_metrics(model, features, val_pairs, val_lab, labels[val_lab]))
        history.append({"epoch": epoch, "val_loss": val_loss, "val_metric": metric})
        bar.set_postfix(val_loss=f"{val_loss:.3f}", val_acc=f"{metric:.3f}")
        if (metric, -val_loss) > (best[0], -best[1]):
            best, best_epoch = (metric, val_loss), epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= settings.patience:
            break
    model.load_state_dict(best_state)
    train = probe_metrics(model, features, train_pairs, train_lab, labels[train_lab])
    best_probe = max(range(model.num_layers), key=train["per_layer_accuracy"].__getitem__)
    calibration = {"scale": 1.0, "offset": 0.0, "fitted_on": "nothing (no validation split)"}
    if has_val:  # the split it early-stopped on: the only rows the joint fit did not train on
        rows = _rows_of(val_pairs, val_lab)
        position = torch.full((features.shape[0],), -1, dtype=torch.long)
        position[rows] = torch.arange(len(rows))
        with torch.no_grad():
            reward = model(features[rows])
        calibration = {**calibrate(reward, position[val_pairs], position[val_lab], labels[val_lab]),
                       "fitted_on": "the validation split"}
    return {"best_probe_index": best_probe, "best_epoch": best_epoch, "epochs_run": len(history) or settings.epochs,
            "calibration": calibration}


# ------------------------------------------------------------------------------ calibration


def calibrate(reward: torch.Tensor, pairs: torch.Tensor, rows: torch.Tensor, safe: torch.Tensor) -> dict:
    """Scale a (and offset o) so that sigmoid(a (r_c - r_r)) and sigmoid(a r + o) are probabilities.

    Fitted by maximum likelihood on rewards of rows the reward model did not train on, with a standard normal
    prior on log a (and a wide one on o): when those rewards separate every pair, the likelihood alone would
    send a to infinity and every confidence to 1.
    """
    reward = reward.detach().double()
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    offset = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def objective():
        scale = log_scale.exp()
        total = 0.5 * log_scale ** 2 + 0.5 * (offset / 10) ** 2
        if len(pairs):
            total = total + F.softplus(-scale * (reward[pairs[:, 0]] - reward[pairs[:, 1]])).sum()
        if len(rows):
            total = total + F.binary_cross_entropy_with_logits(scale * reward[rows] + offset, safe.double(),
                                                               reduction="sum")
        return total

    _minimise([log_scale, offset] if len(rows) else [log_scale], objective)
    return {"scale": float(log_scale.detach().exp()), "offset": float(offset.detach())}


def recalibrate(model: HybridRewardModel, fs, source: str) -> dict:
    """Refit the model's calibration on another labelled set (the policy's own answers); returns how well the
    reward ranks that set and the calibration error before and after (after is in-sample)."""
    pairs = fs.pair_index if fs.pair_index is not None else torch.empty(0, 2, dtype=torch.long)
    labels = fs.labels if fs.labels is not None else torch.full((fs.features.shape[0],), -1, dtype=torch.long)
    rows = torch.nonzero(labels >= 0).flatten()
    metrics: dict = {}
    with torch.no_grad():
        reward = model(fs.features)
    if len(rows) and 0 < int(labels[rows].sum()) < len(rows):
        metrics["calibration_data_auc"] = float(roc_auc_score(labels[rows].numpy(), reward[rows].numpy()))
    if len(pairs):
        metrics["calibration_data_pair_accuracy"] = float((reward[pairs[:, 0]] > reward[pairs[:, 1]]).float().mean())
    metrics["calibration_data_ece_before"] = calibration_report(model, fs.features, pairs, rows, labels[rows]).get("ece")
    model.config["calibration"] = {**calibrate(reward, pairs, rows, labels[rows]), "fitted_on": source}
    metrics.update(calibration_scale=model.calibration["scale"], calibration_offset=model.calibration["offset"],
                   calibration_data_ece=calibration_report(model, fs.features, pairs, rows, labels[rows]).get("ece"),
                   calibration_data_rows=len(rows) + 2 * len(pairs))
    return metrics


def reliability(probability: torch.Tensor, truth: torch.Tensor, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error and the reliability table (equal-width bins; empty bins left out)."""
    probability, truth = probability.double().flatten(), truth.double().flatten()
    which = (probability * bins).long().clamp(max=bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            predicted, observed, count = probability[inside].mean().item(), truth[inside].mean().item(), int(inside.sum())
            table.append({"bin": [b / bins, (b + 1) / bins], "predicted": predicted, "observed": observed,
                          "count": count})
            ece += count / len(probability) * abs(predicted - observed)
    return ece, table


@torch.no_grad()
def calibration_report(model: HybridRewardModel, features, pairs, labelled_rows, labels) -> dict:
    """ECE, reliability table and the spread of the calibrated confidence on held-out pairs / rows."""
    scale, offset = model.calibration["scale"], model.calibration["offset"]
    report: dict = {}
    if pairs is not None and len(pairs):
        rows = _rows_of(pairs, None)
        reward = torch.zeros(features.shape[0])
        reward[rows] = model(features[rows])
        gamma = torch.sigmoid(scale * (reward[pairs[:, 0]] - reward[pairs[:, 1]]))
        # each pair counts both ways: P(chosen safer) = gamma is right, P(rejected safer) = 1 - gamma is wrong
        report["ece"], report["reliability"] = reliability(torch.cat([gamma, 1 - gamma]),
                                                           torch.cat([torch.ones_like(gamma), torch.zeros_like(gamma)]))
        report["confidence_quantiles"] = dict(zip(("q05", "q25", "q50", "q75", "q95"), torch.quantile(
            gamma.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()))
    elif labelled_rows is not None and len(labelled_rows):
        probability = torch.sigmoid(scale * model(features[labelled_rows]) + offset)
        report["ece"], report["reliability"] = reliability(probability, labels)
    return report
