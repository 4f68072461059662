"""rbrm's features file: hidden states [N, L, d] with labels or a pair index, as safetensors (never pickle), and
its metadata (model, layers, pooling) as JSON strings. Written by `rbrm features` and the probe stage; read by
probe training, `rbrm model` and the report's figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import DataError
from .files import atomic_path, check_input_file


def save_features(path: str, features: torch.Tensor, metadata: dict | None = None,
                  labels: torch.Tensor | None = None, pair_index: torch.Tensor | None = None) -> None:
    """Write features (+ labels / pair_index) as safetensors, atomically; metadata as JSON strings."""
    tensors = {"features": features.float().contiguous()}
    if labels is not None:
        tensors["labels"] = labels.long().contiguous()
    if pair_index is not None:
        tensors["pair_index"] = pair_index.long().contiguous()
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


@dataclass
class FeatureSet:
    features: torch.Tensor  # [N, L, d] float32
    labels: torch.Tensor | None = None  # [N] int64, 1 = safe, 0 = unsafe
    pair_index: torch.Tensor | None = None  # [P, 2] int64: (chosen row, rejected row)
    metadata: dict = field(default_factory=dict)


def load_features(path: str) -> FeatureSet:
    """Read a features file; only `features` and `labels` or `pair_index` are required."""
    check_input_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            raw_meta = f.metadata() or {}
            if "features" not in keys:
                raise DataError(path, None, "features", f"no such tensor (found: {sorted(keys)})")
            tensors = {k: f.get_tensor(k) for k in keys}
    except SafetensorError as err:
        raise DataError(path, None, None, f"not a readable safetensors file: {err}") from None
    features = tensors["features"].float()
    if features.dim() == 2:
        features = features.unsqueeze(1)  # one layer
    if features.dim() != 3:
        raise ValueError(f"{path}: 'features' must be [N, L, d], got shape {tuple(features.shape)}")
    labels, pairs = tensors.get("labels"), tensors.get("pair_index")
    n = features.shape[0]
    if labels is None and pairs is None:
        raise ValueError(f"{path}: needs 'labels' [N] or 'pair_index' [P, 2] besides 'features'")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{path}: 'labels' must have shape [{n}], got {tuple(labels.shape)}")
    if pairs is not None and (pairs.dim() != 2 or pairs.shape[1] != 2 or (pairs.numel() and (
            pairs.min() < 0 or pairs.max() >= n))):
        raise ValueError(f"{path}: 'pair_index' must be [P, 2] row numbers in 0..{n - 1}")
    metadata = {}
    for key, value in raw_meta.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return FeatureSet(features, None if labels is None else labels.long(),
                      None if pairs is None else pairs.long(), metadata)
