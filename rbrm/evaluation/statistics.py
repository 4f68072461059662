"""Rates with percentile-bootstrap intervals, and how well a reward ranks the policy's own samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score

from ..render import prompt_key


def bootstrap_ci(values: Sequence[float] | np.ndarray, resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> list[float] | None:
    """Percentile-bootstrap interval of the mean (scipy.stats.bootstrap); None for no data. Seeded, so a rerun
    reports the same."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    if x.size == 0:
        return None
    if x.size == 1:  # scipy needs two observations; every resample of one value is that value
        return [float(x[0]), float(x[0])]
    result = bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
                       vectorized=True, batch=max(1, 4_000_000 // x.size),  # bounds memory on large sets
                       random_state=np.random.default_rng(seed))
    lo, hi = result.confidence_interval
    return [float(lo), float(hi)]


def rate_with_ci(flags: Sequence[bool], resamples: int, seed: int) -> tuple[float | None, list[float] | None]:
    x = np.asarray(flags, dtype=np.float64)
    if not x.size:
        return None, None
    return float(x.mean()), bootstrap_ci(x, resamples, seed=seed)


def aggregate(rows: Sequence[dict], benign: bool = False, resamples: int = 1000, seed: int = 0) -> dict:
    """Rates with intervals over judged rows, overall and per `category` (when any row has one)."""
    unsafe = [bool(r["unsafe"]) for r in rows]
    refusal = [bool(r["refusal"]) for r in rows]
    unsafe_rate, unsafe_ci = rate_with_ci(unsafe, resamples, seed)
    refusal_rate, refusal_ci = rate_with_ci(refusal, resamples, seed)
    out: dict[str, Any] = {
        "n": len(rows),
        "unsafe_rate": unsafe_rate, "unsafe_rate_ci": unsafe_ci,
        "safe_rate": None if unsafe_rate is None else 1.0 - unsafe_rate,  # what the paper reports
        "refusal_rate": refusal_rate, "refusal_rate_ci": refusal_ci,
        "unsafe_count": sum(unsafe), "refusal_count": sum(refusal),
        "mean_score": float(np.mean([r["score"] for r in rows])) if rows else None,
    }
    if benign:
        out["over_refusal_rate"], out["over_refusal_rate_ci"] = refusal_rate, refusal_ci
    if rows and all(r.get("helpful") is not None for r in rows):
        out["helpfulness_rate"], out["helpfulness_rate_ci"] = rate_with_ci([bool(r["helpful"]) for r in rows], resamples,
                                                                    seed)
        out["helpful_count"] = sum(bool(r["helpful"]) for r in rows)
    if any(r.get("category") is not None for r in rows):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(str(r["category"]) if r.get("category") is not None else "(none)", []).append(r)
        out["categories"] = {}
        for name in sorted(groups):
            g = groups[name]
            u_rate, u_ci = rate_with_ci([bool(r["unsafe"]) for r in g], resamples, seed)
            r_rate, r_ci = rate_with_ci([bool(r["refusal"]) for r in g], resamples, seed)
            out["categories"][name] = {"n": len(g), "unsafe_rate": u_rate, "unsafe_rate_ci": u_ci,
                                       "refusal_rate": r_rate, "refusal_rate_ci": r_ci}
    return out


def within_prompt_auc(scores: Sequence[float], safe: Sequence[bool], groups: Sequence) -> tuple[float | None, int]:
    """(AUC over the pairs of samples of one group that the labels tell apart, number of such pairs).

    Re-ranking only ever compares answers to the same prompt; an AUC over all samples also credits a score for
    knowing which prompts draw unsafe answers, which picks no pair. Ties count a half. None when no group
    holds both a safe and an unsafe sample.
    """
    scores, safe = np.asarray(scores, dtype=float), np.asarray(safe, dtype=bool)
    groups = np.asarray([str(g) for g in groups])
    concordant, n_pairs = 0.0, 0
    for group in np.unique(groups):
        rows = groups == group
        good, bad = scores[rows & safe], scores[rows & ~safe]
        diff = good[:, None] - bad[None, :]
        concordant += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        n_pairs += diff.size
    return (concordant / n_pairs if n_pairs else None), n_pairs


def ranking_quality(samples: Sequence[dict], pairs: Sequence[dict], judge) -> dict:
    """How well the hybrid reward ranks the policy's own samples, judged by `judge`.

    samples: rank.jsonl rows (prompt, response, score, prompt_id); pairs: pairs.jsonl rows (prompt, chosen,
    rejected as one assistant message each). Reports the AUC of the reward against the judge's safe verdict,
    the same AUC within a prompt (`within_prompt_auc`: what re-ranking uses), and for the pairs DPO trains on
    how often the judge calls the chosen answer safer, the same, or less safe,
    and how often the judge's own unsafe score orders the pair as the reward does. Samples of benign pool
    prompts (prompt_id `benign:...`) and their pairs are left out: no answer to them is unsafe.
    """
    def text(message) -> str:
        return message[-1]["content"] if isinstance(message, list) else message

    benign = {prompt_key(r["prompt"]) for r in samples if str(r.get("prompt_id", "")).startswith("benign:")}
    samples = [r for r in samples if prompt_key(r["prompt"]) not in benign]
    pairs = [r for r in pairs if prompt_key(r["prompt"]) not in benign]

    items = {(prompt_key(r["prompt"]), r["response"]) for r in samples}
    items |= {(prompt_key(r["prompt"]), text(r[side])) for r in pairs for side in ("chosen", "rejected")}
    items = sorted(items)
    verdicts = dict(zip(items, judge.judge([p for p, _ in items], [r for _, r in items])))
    safe = np.array([not verdicts[(prompt_key(r["prompt"]), r["response"])].unsafe for r in samples])
    score = np.array([r["score"] for r in samples], dtype=float)
    within, mixed = within_prompt_auc(score, safe, [prompt_key(r["prompt"]) for r in samples])
    out: dict = {"judge": getattr(judge, "name", "judge"), "samples": len(samples),
                 "judged_unsafe_rate": float(1 - safe.mean()) if len(safe) else None,
                 "auc": float(roc_auc_score(safe, score)) if 0 < safe.sum() < len(safe) else None,
                 "within_prompt_auc": within, "within_prompt_pairs": mixed}
    if pairs:
        chosen = [verdicts[(prompt_key(r["prompt"]), text(r["chosen"]))] for r in pairs]
        rejected = [verdicts[(prompt_key(r["prompt"]), text(r["rejected"]))] for r in pairs]
        out.update(pairs=len(pairs),
                   chosen_safer=sum(r.unsafe and not c.unsafe for c, r in zip(chosen, rejected)) / len(pairs),
                   same_verdict=sum(c.unsafe == r.unsafe for c, r in zip(chosen, rejected)) / len(pairs),
                   chosen_less_safe=sum(c.unsafe and not r.unsafe for c, r in zip(chosen, rejected)) / len(pairs),
                   judge_score_agrees=sum(c.score < r.score for c, r in zip(chosen, rejected)) / len(pairs),
                   judge_score_ties=sum(c.score == r.score for c, r in zip(chosen, rejected)) / len(pairs))
    return out


def pct(rate: float | None, ci: list[float] | None) -> str:
    if rate is None:
        return "-"
    return f"{100 * rate:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else f"{100 * rate:.1f}%"
