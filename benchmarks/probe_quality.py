"""Probe quality on the bundled pairs: held-out, cross-dataset, baseline, and bf16 against fp32 features.

    .venv/bin/python benchmarks/probe_quality.py [--hh-pairs 658] [--out runs/probe_quality]

Data: the single-turn HH-RLHF harmless pairs (noisy "more harmless" labels) and XSTest's human-labelled
refusal-versus-compliance pairs. Splits are by prompt. Features are cached under --out.
Prints one table; writes --out/probe_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from rbrm.feature_files import FeatureSet, load_features, save_features
from rbrm.features import examples_to_rows, extract_features
from rbrm.files import write_json
from rbrm.formats import load_pairs
from rbrm.models import load_model
from rbrm.probe_train import logistic_baseline
from rbrm.render import prompt_key
from rbrm.reward_model import (
    RewardTrainConfig,
    probe_metrics,
    row_groups,
    train_reward_model,
    train_val_split,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")
HH = os.path.join(ROOT, "data", "hh_rlhf_harmless_test", "derived_pku_format.jsonl")
XSTEST = os.path.join(ROOT, "data", "xstest", "derived_unsafe_prompt_pairs_pku_format.jsonl")


def features_for(name: str, pairs, dtype: str, out: str, models: dict) -> tuple[FeatureSet, torch.Tensor]:
    path = os.path.join(out, f"{name}_{dtype}.safetensors")
    rows, labels, pair_index = examples_to_rows(pairs, [])
    keys: dict[str, int] = {}
    groups = torch.tensor([keys.setdefault(prompt_key(p), len(keys)) for p, _ in rows])
    if not os.path.exists(path):
        if dtype not in models:
            models[dtype] = load_model(dtype=dtype)
        model, tokenizer = models[dtype]
        feats = extract_features(model, tokenizer, rows, batch_tokens=2048)
        save_features(path, feats, {"dtype": dtype}, labels, pair_index)
    return load_features(path), groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hh-pairs", type=int, default=658, help="single-turn HH pairs to use")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "probe_quality"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        help="feature dtypes to compare (the first is the reference for the cross-dtype check)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    hh = [p for p in load_pairs(HH) if isinstance(p.prompt, str)][: args.hh_pairs]
    xs = load_pairs(XSTEST)
    settings = RewardTrainConfig(seed=args.seed)
    models: dict = {}
    results: dict = {"n_hh_pairs": len(hh), "n_xstest_pairs": len(xs)}
    trained = {}
    for dtype in args.dtypes:
        for name, pairs in (("hh", hh), ("xstest", xs)):
            fs, groups = features_for(name, pairs, dtype, args.out, models)
            model, metrics = train_reward_model(fs.features, fs.pair_index, None, settings, groups, progress=False)
            generator = torch.Generator().manual_seed(settings.seed)
            n = fs.features.shape[0]
            train_rows, _ = train_val_split(n, row_groups(n, fs.pair_index, groups), settings.val_fraction, generator)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[train_rows] = True
            base = logistic_baseline(fs.features, fs.pair_index, torch.full((n,), -1), mask, settings.seed)
            trained[(name, dtype)] = (model, fs)
            results[f"{name}_{dtype}"] = {
                "val_pair_accuracy": metrics["val_pair_accuracy"],
                "val_hard_accuracy": metrics["val_hard_accuracy"],
                "n_val_pairs": metrics["n_val_pairs"],
                "best_layer_probe_accuracy": max(metrics["per_layer_accuracy"]),
                "best_layer": 1 + max(range(len(metrics["per_layer_accuracy"])),
                                      key=metrics["per_layer_accuracy"].__getitem__),
                "baseline_logreg_val_accuracy": base["baseline_val_accuracy"],
                "baseline_layer": base["baseline_layer_index"] + 1,
                "per_layer_accuracy": metrics["per_layer_accuracy"],
                "gate_weights": metrics["val_gate_weights"],
            }
    for dtype in args.dtypes:
        for src, dst in (("hh", "xstest"), ("xstest", "hh")):
            model, _ = trained[(src, dtype)]
            _, fs = trained[(dst, dtype)]
            results[f"{src}_to_{dst}_{dtype}"] = probe_metrics(model, fs.features, fs.pair_index)["pair_accuracy"]
    # A probe trained on bf16 features applied to fp32 states (DPO on CPU runs in fp32).
    for name in ("hh", "xstest") if {"bfloat16", "float32"} <= set(args.dtypes) else ():
        model, _ = trained[(name, "bfloat16")]
        _, fs32 = trained[(name, "float32")]
        results[f"{name}_bf16_probe_on_fp32_all_pairs"] = probe_metrics(model, fs32.features, fs32.pair_index)["pair_accuracy"]
        _, fs16 = trained[(name, "bfloat16")]
        results[f"{name}_bf16_probe_on_bf16_all_pairs"] = probe_metrics(model, fs16.features, fs16.pair_index)["pair_accuracy"]
    write_json(os.path.join(args.out, "probe_quality.json"), results)
    print(f"{'set':<16}{'hybrid val acc':>16}{'hard acc':>10}{'best layer':>12}{'logreg (layer)':>18}{'n val':>7}")
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"{key:<16}{value['val_pair_accuracy']:>16.3f}{value['val_hard_accuracy']:>10.3f}"
                  f"{value['best_layer_probe_accuracy']:>8.3f} ({value['best_layer']:>2})"
                  f"{value['baseline_logreg_val_accuracy']:>12.3f} ({value['baseline_layer']:>2}){value['n_val_pairs']:>7}")
    for key, value in results.items():
        if not isinstance(value, dict):
            print(f"{key:<40} {value if isinstance(value, int) else f'{value:.3f}'}")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
