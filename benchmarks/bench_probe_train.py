"""Probe training at a 7B model's size: `rbrm probe train --features` on 600 rows x 32 layers x 4096, timed.

The features are synthetic but shaped like a 7B chat model's last-token states: per-dimension scales spread
over two orders of magnitude, a few outlier dimensions, and a safe/unsafe direction whose strength rises and
falls across the layers (absent in the first and last few), so the layers really differ, and noise shared
across layers, as in a residual stream, so that averaging layers does not average it away. Labels are pointwise
(safe / unsafe), 300 prompts with two answers each, as in a labelled set of a model's own answers.

The staged fit (the default) and the paper's joint fit run side by side on the same file; the last line is
`ratio=<joint s / staged s>`. Both include what `rbrm probe train` does by default (the scikit-learn
best-layer baseline and the save).

    .venv/bin/python benchmarks/bench_probe_train.py [--rows 600] [--layers 32] [--hidden 4096] [--skip-joint]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch

from rbrm.feature_files import save_features
from rbrm.machine import machine_summary
from rbrm.probe_train import ProbeTrainConfig, run_probe_train


def synthetic_features(rows: int, layers: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    safe = (torch.arange(rows) % 2 == 0).long()
    scale = torch.exp(torch.randn(layers, hidden, generator=g) * 1.2)  # dimensions of very different size
    scale[:, torch.randperm(hidden, generator=g)[:4]] *= 30  # a few outlier dimensions, as in real LMs
    # the residual stream: neighbouring layers share most of their direction and most of their noise
    drift = torch.randn(layers, hidden, generator=g).cumsum(0) / layers ** 0.5
    direction = torch.nn.functional.normalize(torch.randn(1, hidden, generator=g) + 0.5 * drift, dim=-1)
    depth = torch.linspace(0, 1, layers)
    strength = 0.15 * torch.exp(-((depth - 0.55) / 0.2) ** 2)  # signal peaks in the middle layers
    strength[:2] = 0
    strength[-2:] = 0
    prompt = torch.randn(rows // 2, layers, hidden, generator=g).repeat_interleave(2, 0)  # answers share a prompt
    noise = 0.8 * torch.randn(rows, 1, hidden, generator=g) + 0.6 * torch.randn(rows, layers, hidden, generator=g)
    sign = (2 * safe - 1).float()[:, None, None]
    features = (0.7 * prompt + 0.7 * noise) * scale + sign * strength[None, :, None] * direction * scale.mean()
    groups = torch.arange(rows) // 2
    return features, safe, groups


def run(path: str, fit: str, out: str) -> tuple[float, dict]:
    start = time.perf_counter()
    metrics = run_probe_train(ProbeTrainConfig(out=out, features=path, fit=fit))
    return time.perf_counter() - start, metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--skip-joint", action="store_true", help="time the staged fit only")
    args = parser.parse_args()
    features, safe, groups = synthetic_features(args.rows, args.layers, args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.safetensors")
        save_features(path, features, {"groups": groups.tolist()}, labels=safe)
        del features
        results = {}
        for fit in ("staged",) + (() if args.skip_joint else ("joint",)):
            results[fit] = run(path, fit, os.path.join(tmp, fit))
    print(f"machine: {machine_summary()}")
    print(f"shape={args.rows}x{args.layers}x{args.hidden} peak_rss_gib="
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}")
    for fit, (seconds, m) in results.items():
        print(f"{fit:>7}: {seconds:6.1f} s  held-out accuracy hybrid {m['val_accuracy']:.3f}, mean of probes "
              f"{m['val_mean_probe_accuracy']:.3f}, best probe {m['val_best_probe_accuracy']:.3f}, "
              f"sklearn best layer {m['baseline_val_accuracy']:.3f}")
    if "joint" in results:
        print(f"ratio={results['joint'][0] / results['staged'][0]:.2f}")


if __name__ == "__main__":
    main()
