"""`rbrm features`: hidden states at the response end for every layer of a pairs or labelled file, as safetensors."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..feature_files import save_features
from ..features import examples_to_rows, extract_features, feature_metadata, resolve_layers
from ..formats import load_examples
from ..models import DEFAULT_MODEL, load_model


@dataclass
class FeaturesConfig:
    data: str = field(metadata={"help": "pairs or labelled responses (PKU, HH, TRL, paper samples, labelled)"})
    out: str = field(metadata={"help": "output .safetensors file"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "alias, folder, .gguf or hub id"})
    layers: list[int] | None = field(default=None, metadata={"help": "1-based layers (default: all)"})
    pooling: str = field(default="last", metadata={"help": "last (end-of-turn token) or mean over response"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on CUDA; on a CPU the faster of fp32 and bf16 there, measured once per machine; "
                "RBRM_CPU_PRECISION=fp32|bf16 forces it), float32, bfloat16"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    batch_tokens: int = field(default=4096, metadata={"help": "at most this many padded tokens per forward"})
    batch_size: int = field(default=64, metadata={"help": "at most this many prompts per forward"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N pairs/rows"})
    format: str = field(default="auto", metadata={"help": "input format (default: detect)"})


def run_features(config: FeaturesConfig) -> None:
    pairs, labelled = load_examples(config.data, format=config.format, limit=config.limit)
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    rows, labels, pair_index = examples_to_rows(pairs, labelled)
    layers = resolve_layers(model, config.layers)
    start = time.perf_counter()
    stats: dict = {}
    features = extract_features(model, tokenizer, rows, layers, config.pooling, config.batch_tokens,
                                config.batch_size, stats=stats)
    seconds = time.perf_counter() - start
    meta = feature_metadata(model, tokenizer, layers, config.pooling)
    meta["source"] = config.data
    save_features(config.out, features, meta, labels, pair_index)
    rate = stats["forward_tokens"] / max(seconds, 1e-9)
    print(f"wrote {config.out}: features {tuple(features.shape)}, {len(pairs)} pairs, "
          f"{len(labelled)} labelled rows, {seconds:.1f} s ({rate:.0f} tokens/s)")
