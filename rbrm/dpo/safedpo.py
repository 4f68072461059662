"""SafeDPO's data: helpfulness pairs with per-response safety labels, turned into DPO rows with a safety margin.

Kim et al., "SafeDPO: A Simple Approach to Direct Preference Optimization with Enhanced Safety", ICLR 2026
(arXiv 2505.20065). No reward or cost model: the data are helpfulness preferences y_w > y_l | x with binary
unsafety indicators h_w, h_l (1 = unsafe), and training is DPO with one extra term,

    L = -E log sigmoid( beta log pi(y~_w)/pi_ref(y~_w) - beta log pi(y~_l)/pi_ref(y~_l) - (h~_l - h~_w) Delta ),

over the pairs after the safety-aware transformation T (`safedpo_transform`):
  * h_w = 0 (the preferred answer is safe): kept as it is;
  * h_w = 1, h_l = 0: swapped, so that the safe answer is preferred;
  * h_w = 1, h_l = 1 (both unsafe): dropped.
After T, h~_l - h~_w is 1 on a safe-over-unsafe pair and 0 on a safe-over-safe one: the row's `safety_margin`.
The trainer multiplies it by `ConfidenceDPOConfig.safety_margin` (Delta >= 0; the paper's default is 10, with
beta = 0.1). Delta = 0 is plain DPO on T's pairs.

Sources: the transformation, the loss and the defaults as the ICLR 2026 paper note at
en.papernotes.org/ICLR2026/llm_alignment/safedpo_preference_optimization_safety/ states them (its sections
"Safety-aware data transformation T" and "SafeDPO loss and safety margin"); the data model (helpfulness preferences,
h = 1{c(x, y) > 0}) as the arXiv v1 review at themoonlight.io states it; the abstract (arXiv 2505.20065 v2: one
extra hyperparameter, no reward or cost model, no sampling). Not checked against the paper's own text, whose body
could not be read here: the discard of both-unsafe pairs (the note says "discarded"; one public re-implementation
does the same) and the defaults Delta = 10, beta = 0.1. TRL's `sigmoid` loss has no label smoothing, nor does this.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..errors import DataError
from ..formats import PreferencePair, SafetyLabelledPair, load_safety_labelled_pairs
from .data import preference_dataset

log = logging.getLogger(__name__)

SAFETY_MARGIN_COLUMN = "safety_margin"  # h~_l - h~_w per row; the trainer multiplies it by the config's Delta


def safedpo_transform(pair: SafetyLabelledPair) -> dict | None:
    """SafeDPO's T on one pair: the row {prompt, chosen, rejected, safety_margin}, or None for a pair it drops.

    The safe answer of a mixed pair is always the chosen one (swapped if helpfulness preferred the unsafe one),
    so `safety_margin` = h~_rejected - h~_chosen is 1 there and 0 on a pair of two safe answers."""
    if not pair.chosen_safe and not pair.rejected_safe:
        return None  # both unsafe: no preference between them is compatible with the constraint
    chosen, rejected = (pair.chosen, pair.rejected) if pair.chosen_safe else (pair.rejected, pair.chosen)
    margin = 0.0 if pair.chosen_safe and pair.rejected_safe else 1.0
    return {"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, SAFETY_MARGIN_COLUMN: margin}


def safedpo_rows(pairs: Iterable[SafetyLabelledPair], source: Any = "the pairs") -> list[dict]:
    """T over every pair (`safedpo_transform`), saying how many were kept, swapped and dropped; a DataError
    naming `source` when none is left to train on."""
    rows, counts = [], Counter()
    for pair in pairs:
        row = safedpo_transform(pair)
        if row is None:
            counts["dropped (both unsafe)"] += 1
            continue
        counts["kept" if pair.chosen_safe else "swapped (the unsafe one was preferred)"] += 1
        rows.append(row)
    log.info("SafeDPO transformation of %s: %s", source, ", ".join(f"{n} {what}" for what, n in counts.items()))
    if not rows:
        raise DataError(source, None, None, f"SafeDPO keeps no pair: all {sum(counts.values())} have two unsafe "
                                            "responses")
    return rows


def load_safedpo_rows(path: Any, limit: int | None = None) -> list[dict]:
    """SafeDPO's training rows from a PKU-SafeRLHF file (every response safety-labelled; `limit` caps the pairs
    read, before T): write them as TRL jsonl and `pairs_dataset` reads them back with their `safety_margin`."""
    return safedpo_rows(load_safety_labelled_pairs(path, limit=limit), source=path)


def safedpo_dataset(path: Any, tokenizer, limit: int | None = None):
    """`load_safedpo_rows` rendered for `ConfidenceDPOTrainer` (as `preference_dataset`), `safety_margin` kept."""
    pairs = [PreferencePair(row["prompt"], row["chosen"], row["rejected"], str(path),
                            {SAFETY_MARGIN_COLUMN: row[SAFETY_MARGIN_COLUMN]})
             for row in load_safedpo_rows(path, limit)]
    return preference_dataset(pairs, tokenizer, source=str(path))
