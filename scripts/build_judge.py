"""Rebuild a shipped judge (`rbrm/judge_weights/`) and print what it measured.

Usage: python scripts/build_judge.py [--states | --helpfulness-states | --helpfulness] [--out-dir DIR] [--seed 0]
Same seed and data give the same weights and metrics; the builders are `scripts/judge_builders.py`: without a
flag the `minilm` judge (`build_minilm_judge`), `--states` the default `states` judge (`build_states_judge`,
about 5 minutes on 2 CPU cores), `--helpfulness-states` the default helpfulness measure
(`build_states_helpfulness`, about 17 minutes), `--helpfulness` the earlier `minilm` helpfulness heads
(`build_helpfulness_head`).
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> int:
    from judge_builders import (
        build_helpfulness_head,
        build_minilm_judge,
        build_states_helpfulness,
        build_states_judge,
    )

    from rbrm.judges import WEIGHTS_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(WEIGHTS_DIR), help="where the .safetensors and .json go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--data-dir", default=None, help="the project's data/ folder (default: the repo's)")
    parser.add_argument("--device", default=None, help="device for the encoder or judge model (default cpu)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--states", action="store_true", help="build the default `states` judge")
    which.add_argument("--helpfulness-states", action="store_true", help="build the default helpfulness measure")
    which.add_argument("--helpfulness", action="store_true", help="build the earlier minilm helpfulness heads")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.helpfulness:
        metrics = build_helpfulness_head(args.out_dir, seed=args.seed, data_dir=args.data_dir, device=args.device)
        print(json.dumps({k: metrics[k] for k in ("version", "heads", "measured")}, indent=2))
        return 0
    if args.helpfulness_states:
        meta = build_states_helpfulness(args.out_dir, seed=args.seed, data_dir=args.data_dir, device=args.device)
        print(json.dumps({k: meta[k] for k in ("version", "head", "selection", "training_data")}, indent=2))
        lomo = meta["measured"]["leave_one_model_out"]["per_model"]["all"]
        unseen = meta["measured"]["leave_one_model_out_unseen_questions"]["per_model"]["all"]
        print(f"leave-one-model-out agreement {lomo['accuracy']:.3f} (deflection recall "
              f"{lomo['deflection_recall']:.3f}); on unseen questions {unseen['accuracy']:.3f}")
        return 0
    if args.states:
        meta = build_states_judge(args.out_dir, seed=args.seed, data_dir=args.data_dir, device=args.device)
        print(json.dumps({k: meta[k] for k in ("version", "head", "selection", "measured")}, indent=2))
        return 0
    metrics = build_minilm_judge(args.out_dir, seed=args.seed, data_dir=args.data_dir, device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
