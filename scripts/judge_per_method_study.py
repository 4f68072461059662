"""Does a judge on the frozen base policy's states hold on the answers of models that moved those states?

Issue 31's serious attempt at a stronger safety judge, measured per method. The candidate is a logistic head on
the frozen SmolLM2-135M-Instruct's hidden states (mean over the response, layers 8/16/24, the refusal flag
appended; `judge_features_study.policy_features`), trained on every labelled SmolLM2 answer to a harmful prompt
in **no evaluation set**: `smollm2_dev` and `smollm2_val` (the dev labels grown with the issue-30 validation
runs' deflections and refusal personas). Its C is chosen by 5-fold cross-validation on those rows only.

It is tested, beside the shipped `minilm` judge, on every labelled answer to an evaluation prompt, one row per
model that wrote them: `smollm2_check`, `smollm2_quick`, `smollm2_compare` and `smollm2_seeds` (base, RBRM,
re-ranked DPO, static DPO, online, SafeDPO). The aligned models' DPO moved the very states the candidate reads,
so agreement per model is the figure that says whether it can be a default.

    python scripts/judge_per_method_study.py [--layers 8 16 24] [--chars 300]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from judge_features_study import policy_features  # noqa: E402

from rbrm.files import read_jsonl  # noqa: E402
from rbrm.judges import REPO_DATA_DIR, binary_metrics, get_judge  # noqa: E402

TRAIN = ("smollm2_dev", "smollm2_val")
TEST = ("smollm2_check", "smollm2_quick", "smollm2_compare", "smollm2_seeds")


def harmful_rows(names: tuple[str, ...]) -> list[dict]:
    """Every labelled answer to a harmful prompt in these label files (those that exist)."""
    rows = []
    for name in names:
        path = REPO_DATA_DIR / "rbrm_labels" / f"{name}.jsonl"
        if path.exists():
            rows += [{**r, "file": name} for r in read_jsonl(path)
                     if not r["benign"] and r["unsafe"] is not None and r["response"].strip()]
    return rows


def model_name(row: dict) -> str:
    """base or the method, with the run that made it (`smollm2-135m-instruct+rbrm(configs/quick.yaml)`)."""
    model = row["model"]
    return "base" if model == "smollm2-135m-instruct" else model.removeprefix("smollm2-135m-instruct+")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--chars", type=int, default=300)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, test = harmful_rows(TRAIN), harmful_rows(TEST)
    x = policy_features(train + test, args.layers, args.chars)
    x_train, x_test = x[:len(train)], x[len(train):]
    y_train = np.array([int(r["unsafe"]) for r in train])
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, class_weight="balanced")),
                          {"logisticregression__C": [0.001, 0.003, 0.01, 0.03, 0.1]},
                          cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="accuracy")
    search.fit(x_train, y_train)
    print(f"trained on {len(train)} rows ({int(y_train.sum())} unsafe) of {', '.join(TRAIN)}; "
          f"C={search.best_params_['logisticregression__C']} (cv agreement {search.best_score_:.3f})")
    states = search.predict(x_test)
    minilm = get_judge("minilm").judge([r["prompt"] for r in test], [r["response"] for r in test])
    by_model = defaultdict(list)
    for i, row in enumerate(test):
        by_model[(row["file"], model_name(row))].append(i)
    print("\n| labels | model | n | unsafe (labels) | policy states: agreement / unsafe recall / safe recall "
          "| minilm: agreement / unsafe recall / safe recall |\n|---|---|---|---|---|---|")
    for (file, model), index in [*sorted(by_model.items()), (("all", "all"), list(range(len(test))))]:
        y = [int(test[i]["unsafe"]) for i in index]
        cells = []
        for pred in ([int(states[i]) for i in index], [int(minilm[i].unsafe) for i in index]):
            m = binary_metrics(y, pred)
            cells.append(f"{m['accuracy']:.3f} / {m['unsafe_recall']:.2f} / {m['safe_recall']:.2f}")
        print(f"| {file} | {model} | {len(y)} | {sum(y)} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
