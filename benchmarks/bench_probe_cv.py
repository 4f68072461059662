"""`rbrm probe train --features F --cv 5` at a 7B model's size, and its best-single-layer baseline old against new.

Issue 33: on 602 real Llama-2-7B states (32 layers x 4,096) `--cv 5` took 861 s on 2 cores, nearly all of it in
the scikit-learn baseline (32 layers x 3 inner folds, once for the held-out split and once per outer fold, of
lbfgs logistic regression on 4,096-wide rows). The baseline now fits each layer in the span of its training
rows (`probe_train.SpanLogistic`): the same problem in <= ~600 columns.

No real 7B states are on this machine: the features are `bench_probe_train.synthetic_features` (per-dimension
scales over two orders of magnitude, outlier dimensions, noise shared across layers, a safe/unsafe direction
strongest in the middle layers), 602 rows = 301 prompts x (safe, unsafe) answers, as preference pairs (the
default) or as labelled rows (`--labelled`).

1. The baseline on the held-out split's train side, old (`fit="full"`) and new (`fit="span"`) on the same
   data. The old one is timed on `--old-layers` layers spread over the depth and scaled to all layers (said so
   in the output); the new one on those layers too (its results must equal the old's) and on all layers.
2. The whole `--cv 5` run with the new baseline (`run_probe_train`, as the command runs it): goal <= 60 s.
3. The hybrid's CV accuracy against the best-single-layer baseline's, on the same folds.

The last line is `ratio=<old baseline s (scaled) / new baseline s>`.

    python benchmarks/bench_probe_cv.py [--labelled] [--old-layers 4] [--rows 602] [--layers 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe_train import synthetic_features  # noqa: E402

from rbrm.feature_files import save_features  # noqa: E402
from rbrm.machine import machine_summary  # noqa: E402
from rbrm.probe_train import ProbeTrainConfig, logistic_baseline, run_probe_train  # noqa: E402
from rbrm.reward_model import row_groups, train_val_split  # noqa: E402


def held_out_train_mask(n: int, pairs, groups, seed: int = 0, fraction: float = 0.2) -> torch.Tensor:
    """The train side of `run_probe_train`'s held-out split (what its baseline is fitted on)."""
    train_rows, _ = train_val_split(n, row_groups(n, pairs, groups), fraction, torch.Generator().manual_seed(seed))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[train_rows] = True
    return mask


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=602)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--labelled", action="store_true", help="labelled rows instead of preference pairs")
    parser.add_argument("--old-layers", type=int, default=4, help="layers the old baseline is timed on")
    parser.add_argument("--cv", type=int, default=5)
    args = parser.parse_args()
    features, safe, groups = synthetic_features(args.rows, args.layers, args.hidden)
    pairs = None if args.labelled else torch.stack([torch.arange(0, args.rows, 2), torch.arange(1, args.rows, 2)], 1)
    labels = safe if args.labelled else torch.full((args.rows,), -1)
    load = os.getloadavg()[0]
    print(f"machine: {machine_summary()}")
    print(f"shape={args.rows}x{args.layers}x{args.hidden} ({'labelled rows' if args.labelled else 'pairs'}), "
          f"synthetic (no real 7B states here); load average before: {load:.2f}")

    mask = held_out_train_mask(args.rows, pairs, groups)
    subset = torch.linspace(0, args.layers - 1, args.old_layers).round().long().unique()
    old_s, old = timed(lambda: logistic_baseline(features[:, subset], pairs, labels, mask, fit="full"))
    new_sub_s, new_sub = timed(lambda: logistic_baseline(features[:, subset], pairs, labels, mask, fit="span"))
    new_s, new = timed(lambda: logistic_baseline(features, pairs, labels, mask, fit="span"))
    old_scaled = old_s * args.layers / len(subset)
    print(f"baseline on layers {[int(i) + 1 for i in subset]}: old {old_s:.2f} s, new {new_sub_s:.2f} s; "
          f"old layer {int(subset[old['baseline_layer_index']]) + 1} train-CV {old['baseline_train_cv_accuracy']:.4f} "
          f"held-out {old['baseline_val_accuracy']:.4f}; new layer {int(subset[new_sub['baseline_layer_index']]) + 1}"
          f" train-CV {new_sub['baseline_train_cv_accuracy']:.4f} held-out {new_sub['baseline_val_accuracy']:.4f}; "
          f"equal: {old == new_sub}")
    print(f"baseline on all {args.layers} layers: new {new_s:.2f} s (layer {new['baseline_layer_index'] + 1}, "
          f"held-out {new['baseline_val_accuracy']:.4f}); old scaled from {len(subset)} layers: {old_scaled:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.safetensors")
        save_features(path, features, {"groups": groups.tolist()}, labels=safe if args.labelled else None,
                      pair_index=pairs)
        cpu = cpu_seconds()
        cv_s, m = timed(lambda: run_probe_train(ProbeTrainConfig(out=os.path.join(tmp, "probe"), features=path,
                                                                 cv=args.cv)))
        cpu = cpu_seconds() - cpu
    # On shared cores the wall time includes waiting for them; the process's CPU seconds do not.
    print(f"--cv {args.cv} with the new baseline: {cv_s:.1f} s wall, {cpu:.1f} CPU s (goal <= 60 s); load average "
          f"after: {os.getloadavg()[0]:.2f}")
    hybrid, base = m["cv_accuracy"], m["baseline_cv_accuracy"]
    print(f"cv accuracy: hybrid {hybrid:.4f} +- {m['cv_std']:.4f}, best-layer baseline {base:.4f} +- "
          f"{m['baseline_cv_std']:.4f} (folds: hybrid {[round(v, 3) for v in m['cv_folds']]}, baseline "
          f"{[round(v, 3) for v in m['baseline_cv_folds']]}); hybrid >= baseline: {hybrid >= base}")
    print(f"ratio={old_scaled / new_s:.2f}")


if __name__ == "__main__":
    main()
