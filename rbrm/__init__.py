"""rbrm: safety alignment via preference re-ranking and representation-based reward modeling.

The method on in-memory objects, from one import (README, "Use it from Python"): `load_model`, `train_probe`
(the hybrid reward on a model's hidden states), `generate_responses` and `rerank_samples` (candidates ranked
by it), `preference_pairs` and `preference_dataset` (the pairs for DPO), `ConfidenceDPOConfig` and
`ConfidenceDPOTrainer` (DPO weighted by the probe's confidence), `safety_rates` (judged answers, with
intervals). The names load on first use, so `import rbrm` (and `rbrm --help`) stays free of torch, transformers
and TRL, and this package file stays on the ground floor of tests/test_layers.py.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.4.2"

# name -> the module (under rbrm) that defines it
_API = {
    "load_model": "models", "load_tokenizer": "models",
    "PreferencePair": "formats", "LabelledResponse": "formats", "PromptRecord": "formats",
    "load_pairs": "formats", "load_labelled": "formats", "load_prompts": "formats",
    "extract_features": "features",
    "HybridRewardModel": "reward_model", "RewardTrainConfig": "reward_model",
    "train_probe": "probe_train", "probe_features": "probe_train",
    "DecodingConfig": "sampling", "generate_responses": "sampling",
    "Sample": "rerank", "samples_from": "rerank", "rerank_samples": "rerank", "preference_pairs": "rerank",
    "ConfidenceDPOConfig": "dpo", "ConfidenceDPOTrainer": "dpo", "preference_dataset": "dpo",
    "get_judge": "judges", "safety_rates": "evaluation",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import the public name's module on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
