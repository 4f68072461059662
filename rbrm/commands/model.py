"""`rbrm model prepare` and `rbrm probe plot`: the two small commands over the model and the features."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..feature_files import load_features
from ..features import examples_to_rows, extract_features, resolve_layers
from ..formats import load_examples
from ..models import DEFAULT_MODEL, load_model, resolve_model
from ..plots import plot_pca, safe_unsafe_rows


@dataclass
class PrepareConfig:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "alias, local folder, .gguf file or hub id"})


def prepare(config: PrepareConfig) -> None:
    """`rbrm model prepare`: convert once, print the local path."""
    print(resolve_model(config.model))


@dataclass
class ProbePlotConfig:
    out: str = field(metadata={"help": "output PNG"})
    features: str | None = field(default=None, metadata={"help": "features .safetensors (from rbrm features)"})
    data: str | None = field(default=None, metadata={"help": "or a data file (needs --model)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model for --data"})
    layers: list[int] | None = field(default=None, metadata={"help": "layers to draw (default: 4 spread out)"})
    pooling: str = "last"
    limit: int | None = field(default=300, metadata={"help": "rows of --data to use"})
    dtype: str = "auto"


def run_probe_plot(config: ProbePlotConfig) -> None:
    if bool(config.features) == bool(config.data):
        raise ConfigError("give exactly one of --features or --data")
    if config.features:
        fs = load_features(config.features)
        features, labels, pairs = fs.features, fs.labels, fs.pair_index
        names = fs.metadata.get("layers") or list(range(1, features.shape[1] + 1))
        title = os.path.basename(config.features)
    else:
        model, tokenizer = load_model(config.model, dtype=config.dtype)
        rows, labels, pairs = examples_to_rows(*load_examples(config.data, limit=config.limit))
        names = resolve_layers(model, None)
        features = extract_features(model, tokenizer, rows, names, config.pooling)
        title = f"{os.path.basename(config.data)} on {model.config.name_or_path.rstrip('/').split('/')[-1]}"
    layers = config.layers or sorted({names[round(i * (len(names) - 1) / 3)] for i in range(4)})
    safe, unsafe = safe_unsafe_rows(labels, pairs)
    print(plot_pca(features, safe, unsafe, names, layers, config.out, title))
