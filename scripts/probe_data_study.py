"""Which probe training data ranks the policy's own samples best? Chooses `probe.data` on training prompts.

Rebuilds the table of docs/results/README.md ("Choosing the probe's training data"):

    rbrm sample --prompts data/refusal_direction/harmful_train.json --limit 128 --n 4 --max-new-tokens 64 \
        --out runs/probe_data/train1.jsonl
    python scripts/probe_data_study.py --samples train1=runs/probe_data/train1.jsonl [--samples NAME=FILE ...]

Every candidate probe (one bundled set or a mix) is fitted as `rbrm probe train` fits it (staged fit, default
settings) on the base policy's last-token states; the sample files are judged by `minilm` and by the keyword
judge, and scored by each probe. Re-ranking compares answers *of the same prompt*, so the figure that decides
is the within-prompt AUC: over every two samples of one prompt with different verdicts, how often the safe one
scores higher. Also printed: the AUC over all samples, and for each prompt's best- and worst-scored sample
(the pair DPO trains on) how often the judge calls the chosen one safer or less safe.

`own:NAME` candidates are a diagnostic, not a choice: a probe fitted on sample file NAME's own `minilm` verdicts
and scored on the other files, an upper bound on what these states tell about that judge's verdicts.
Sample files should hold answers to training or validation prompts only: the evaluation sets choose nothing.
Features are cached in --out-dir (safetensors); the result is --out-dir/results.json.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from rbrm.evaluation import within_prompt_auc
from rbrm.features import examples_to_rows, extract_features, resolve_layers
from rbrm.files import atomic_path, write_json
from rbrm.formats import LabelledResponse, load_examples
from rbrm.judges import get_judge, load_judge_data
from rbrm.models import load_model
from rbrm.probe_train import drop_too_long
from rbrm.render import prompt_key
from rbrm.rerank import load_samples
from rbrm.reward_model import RewardTrainConfig, train_reward_model

XSTEST = "data/xstest/derived_unsafe_prompt_pairs_pku_format.jsonl"
SOURCES = {  # name -> (file, row limit); salad_qa's file is read by `salad_qa` below
    "xstest160": (XSTEST, 160), "xstest_all": (XSTEST, None),
    "dev_harm": ("data/rbrm_labels/smollm2_dev.jsonl", None),  # its harmful-prompt rows; benign rows give none
    "hh400": ("data/hh_rlhf_harmless_test/derived_pku_format.jsonl", 400),
    "salad_qa": ("data/salad_bench/example_qa.jsonl", None),
}
CANDIDATES = ["xstest160", "xstest_all", "dev_harm", "hh400", "salad_qa", "xstest160+dev_harm",
              "xstest_all+dev_harm", "dev_harm+salad_qa", "xstest160+dev_harm+salad_qa", "xstest160+hh400"]
JUDGES = ("minilm", "refusal")


def salad_qa() -> list[LabelledResponse]:
    """Salad-Bench's labelled QA, read as the `minilm` judge's build reads it (a layout the data loader does not)."""
    return [LabelledResponse(r["prompt"], r["response"], not r["unsafe"], f"salad_qa:{i}")
            for i, r in enumerate((r for r in load_judge_data() if r["source"] == "salad_qa"), 1)]


class Study:
    def __init__(self, model_name: str | None, out_dir: str, batch_tokens: int):
        self.model, self.tokenizer = load_model(model_name, dtype="auto")
        self.layers = resolve_layers(self.model, None)
        self.out_dir, self.batch_tokens = out_dir, batch_tokens

    def features(self, name: str, rows: list) -> torch.Tensor:
        path = os.path.join(self.out_dir, f"features_{name}.safetensors")
        if os.path.exists(path):
            cached = load_file(path)["features"]
            if len(cached) == len(rows):
                return cached
        feats = extract_features(self.model, self.tokenizer, rows, self.layers, "last", self.batch_tokens)
        with atomic_path(path) as tmp:
            save_file({"features": feats.contiguous()}, str(tmp))
        return feats

    def source(self, name: str) -> dict:
        path, limit = SOURCES[name]
        pairs, labelled = ([], salad_qa()) if name == "salad_qa" else load_examples(path, limit=limit)
        pairs, labelled, _ = drop_too_long(self.model, self.tokenizer, pairs, labelled)
        rows, labels, pair_index = examples_to_rows(pairs, labelled)
        return {"features": self.features(name, rows),
                "labels": labels if labels is not None else torch.full((len(rows),), -1, dtype=torch.long),
                "pairs": pair_index if pair_index is not None else torch.empty(0, 2, dtype=torch.long),
                "prompts": [prompt_key(p) for p, _ in rows]}


def concat(parts: list[dict]) -> dict:
    offsets = np.cumsum([0] + [len(p["features"]) for p in parts[:-1]])
    return {"features": torch.cat([p["features"] for p in parts]), "labels": torch.cat([p["labels"] for p in parts]),
            "pairs": torch.cat([p["pairs"] + int(o) for p, o in zip(parts, offsets)]),
            "prompts": [k for p in parts for k in p["prompts"]]}


def fit(data: dict, layers: list[int]):
    keys: dict[str, int] = {}
    groups = torch.tensor([keys.setdefault(p, len(keys)) for p in data["prompts"]], dtype=torch.long)
    labels = data["labels"] if bool((data["labels"] >= 0).any()) else None
    pairs = data["pairs"] if len(data["pairs"]) else None
    probe, metrics = train_reward_model(data["features"], pairs, labels, RewardTrainConfig(), groups,
                                        {"layers": layers}, progress=False)
    return probe.eval(), metrics.get("val_pair_accuracy", metrics.get("val_accuracy"))


def ranking(scores: np.ndarray, prompt_ids: list[str], unsafe: list[bool]) -> dict:
    safe = ~np.asarray(unsafe)
    within, mixed = within_prompt_auc(scores, safe, prompt_ids)
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_prompt.setdefault(p, []).append(i)
    safer = less_safe = 0
    for rows in by_prompt.values():  # the pair DPO trains on: best- and worst-scored, ties by sample order
        best, worst = max(rows, key=lambda i: (scores[i], -i)), min(rows, key=lambda i: (scores[i], -i))
        safer += bool(safe[best] and not safe[worst])
        less_safe += bool(safe[worst] and not safe[best])
    return {"auc": float(roc_auc_score(safe, scores)) if 0 < safe.sum() < len(safe) else None,
            "within_prompt_auc": within, "mixed_pairs": mixed,
            "chosen_safer": safer / len(by_prompt), "chosen_less_safe": less_safe / len(by_prompt)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", action="append", required=True, help="NAME=FILE of `rbrm sample` output")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES,
                        help=f"sources joined by '+' ({', '.join(SOURCES)}), or own:NAME")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out-dir", default="runs/probe_data")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    options = parser.parse_args()
    os.makedirs(options.out_dir, exist_ok=True)
    study = Study(options.model, options.out_dir, options.batch_tokens)
    sets = {}
    for spec in options.samples:
        name, path = spec.split("=", 1)
        samples = load_samples(path)
        verdicts = {j: [v.unsafe for v in get_judge(j).judge([s.prompt for s in samples],
                                                             [s.response for s in samples])] for j in JUDGES}
        sets[name] = {"ids": [s.prompt_id for s in samples], "verdicts": verdicts,
                      "features": study.features(f"samples_{name}", [(s.prompt, s.response) for s in samples])}
        print(f"{name}: {len(samples)} samples, unsafe by " +
              ", ".join(f"{j} {np.mean(v):.1%}" for j, v in verdicts.items()), flush=True)
    sources: dict[str, dict] = {}
    results = {}
    for candidate in options.candidates:
        if candidate.startswith("own:"):
            own = sets[candidate[4:]]
            data = {"features": own["features"], "labels": torch.tensor([0 if u else 1 for u in own["verdicts"]["minilm"]]),
                    "pairs": torch.empty(0, 2, dtype=torch.long), "prompts": own["ids"]}
        else:
            data = concat([sources.setdefault(n, study.source(n)) for n in candidate.split("+")])
        probe, val_accuracy = fit(data, study.layers)
        row = {"val_accuracy": val_accuracy}
        for name, s in sets.items():
            if name == candidate[4:]:
                continue
            with torch.no_grad():
                scores = probe(s["features"]).numpy()
            row[name] = {j: ranking(scores, s["ids"], s["verdicts"][j]) for j in JUDGES}
        results[candidate] = row
        print(f"{candidate}: held-out accuracy {val_accuracy:.3f}; within-prompt AUC (minilm) " + ", ".join(
            f"{n} {row[n]['minilm']['within_prompt_auc']:.3f}" for n in sets if n in row), flush=True)
    write_json(os.path.join(options.out_dir, "results.json"),
               {"samples": {n: {"n": len(s["ids"]), **{f"unsafe_{j}": float(np.mean(v)) for j, v in s["verdicts"].items()}}
                            for n, s in sets.items()}, "candidates": results})


if __name__ == "__main__":
    main()
