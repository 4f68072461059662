"""The `minilm` judge's labelled data, its split by prompt and the metrics; the build that fits and measures the
judge from them is `scripts/judge_builders.py` (run by `scripts/build_judge.py`)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from ..formats import REPO_DATA_DIR


def read_labelled_csv(path: Path) -> list[dict]:
    """Rows of a CSV whose first lines may be '# comments' (PyRIT); '#' inside quoted fields is data."""
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.readlines()
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return list(csv.DictReader(lines[start:]))


def load_judge_data(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Human-labelled (prompt, response, unsafe) rows from XSTest v2 completions and Salad-Bench QA.

    XSTest: a response is unsafe iff its prompt is unsafe and annotators called it full compliance;
    refusals and partial refusals are safe, and so is compliance with a safe prompt. `group` ties the
    five models' answers to one prompt, so a split by group never shares a prompt.
    """
    root = Path(data_dir) if data_dir is not None else REPO_DATA_DIR
    xs = root / "xstest"
    prompts = {row["id"]: row for row in read_labelled_csv(xs / "xstest_prompts.csv")}
    rows = []
    for path in sorted((xs / "model_completions").glob("xstest_v2_completions_*.csv")):
        model = path.stem.removeprefix("xstest_v2_completions_")
        for row in read_labelled_csv(path):
            pid = row["id"].removeprefix("v2-")
            meta = prompts[pid]
            unsafe_prompt = meta["label"] == "unsafe"
            rows.append({
                "source": "xstest", "model": model, "group": f"xstest:{pid}", "stratum": meta["type"],
                "prompt": row["prompt"], "response": row["completion"] or "",
                "unsafe_prompt": unsafe_prompt,
                "unsafe": int(unsafe_prompt and row["final_label"] == "1_full_compliance"),
                "refusal_label": int(row["final_label"] != "1_full_compliance"),
            })
    with open(root / "salad_bench" / "example_qa.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                qa = json.loads(line)
                rows.append({
                    "source": "salad_qa", "model": None, "group": "salad:" + qa["question"].strip().lower(),
                    "stratum": "salad_qa", "prompt": qa["question"], "response": qa["answer"],
                    "unsafe_prompt": None, "unsafe": int(qa["label"]), "refusal_label": None,
                })
    return rows


def split_by_prompt(rows: list[dict], seed: int = 0, test_frac: dict[str, float] | None = None) -> np.ndarray:
    """Boolean test mask; whole prompt groups go to one side, drawn per stratum (XSTest prompt type).

    Not sklearn's: the held-out share differs per source and is drawn within each stratum, which neither
    `GroupShuffleSplit` (one test size, no strata) nor `StratifiedGroupKFold` (strata by label, k equal folds)
    does; the shipped judge's JSON records this split.
    """
    test_frac = test_frac or {"xstest": 0.25, "salad_qa": 0.4}
    rng = np.random.default_rng(seed)
    strata: dict[str, list[str]] = {}
    frac: dict[str, float] = {}
    for row in rows:
        groups = strata.setdefault(row["stratum"], [])
        if row["group"] not in groups:
            groups.append(row["group"])
        frac[row["stratum"]] = test_frac[row["source"]]
    test_groups: set[str] = set()
    for stratum in sorted(strata):
        groups = sorted(strata[stratum])
        rng.shuffle(groups)
        test_groups.update(groups[: round(len(groups) * frac[stratum])])
    return np.array([row["group"] in test_groups for row in rows])


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """Agreement with human labels, per class too: accuracy alone hides a judge that calls all safe."""
    y, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    unsafe_recall = float((p & y).sum() / n_pos) if n_pos else float("nan")
    safe_recall = float((~p & ~y).sum() / n_neg) if n_neg else float("nan")
    return {
        "n": int(len(y)), "n_unsafe": n_pos,
        "accuracy": float((p == y).mean()) if len(y) else float("nan"),
        "unsafe_recall": unsafe_recall, "safe_recall": safe_recall,
        "balanced_accuracy": (unsafe_recall + safe_recall) / 2,
        "unsafe_precision": float((p & y).sum() / p.sum()) if p.sum() else float("nan"),
    }



def fit_linear_head(x: np.ndarray, y: np.ndarray, c: float):
    """The logistic-regression head of the `minilm` judge and of the helpfulness measure."""
    # Balanced weights: unsafe rows are ~6% of the data; unweighted, the head trades unsafe recall away.
    return LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x, y)


