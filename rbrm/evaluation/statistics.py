"""Rates with percentile-bootstrap intervals, Wilson and prediction-powered intervals, and how well a reward ranks
the policy's own samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import bootstrap, norm
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


def wilson_ci(successes: float, n: float, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion; `n` may be an effective (non-integer) size. Unlike the normal
    interval it stays informative at 0 of n, the usual audit result for an aligned model."""
    if n <= 0:
        return None
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def stratified_rate(strata: Sequence[tuple[Sequence[bool], int]], level: float = 0.95) -> dict | None:
    """Rate over strata of sizes N_h from a sample of each: (flags of the sampled rows, N_h) per stratum.

    The estimate weights each stratum's sample rate by N_h / N, so equal allocation over sets of unequal size
    does not bias it. The interval is Wilson's at Kish's effective sample size 1 / sum(w_h^2 / n_h) (the plain
    Wilson interval for one stratum). Strata with no sampled row are left out, and `covered` says what share
    of the rows the estimate speaks for.
    """
    used = [(np.asarray(flags, dtype=float), size) for flags, size in strata if len(flags) and size > 0]
    total = sum(size for _, size in strata if size > 0)
    if not used:
        return None
    weights = np.array([size for _, size in used], dtype=float)
    weights /= weights.sum()
    rate = float(sum(w * x.mean() for w, (x, _) in zip(weights, used)))
    n_eff = 1.0 / float(sum(w * w / len(x) for w, (x, _) in zip(weights, used)))
    return {"rate": rate, "ci": wilson_ci(rate * n_eff, n_eff, level), "n": int(sum(len(x) for x, _ in used)),
            "count": int(sum(x.sum() for x, _ in used)), "effective_n": n_eff,
            "covered": sum(size for _, size in used) / total}


def ppi_mean(labels: Sequence[float], labelled_predictions: Sequence[float], all_predictions: Sequence[float],
             power_tuned: bool = False) -> dict:
    """Prediction-powered estimate of a mean (Angelopoulos et al., Science 2023) and its standard error.

    The judge's mean over all N rows, corrected by its mean error on the n labelled rows, which are a random
    sample of the N: theta = lambda * mean_N(f) + mean_n(y - lambda * f). Its variance has a term from each
    part and one because the labelled rows are among the N:
    lambda^2 var_N(f) / N + var_n(y - lambda f) / n + 2 lambda cov_n(f, y - lambda f) / N.
    lambda = 1 is the original estimator. `power_tuned` takes the lambda that minimises that variance (PPI++'s
    power tuning; with the labelled rows among the N it is cov(y, f) / var(f)), clipped to [0, 1], so a useless
    judge costs no more than the labels alone. The interval is the CLT one, estimate +- z * se.
    """
    y = np.asarray(labels, dtype=float)
    f = np.asarray(labelled_predictions, dtype=float)
    big_f = np.asarray(all_predictions, dtype=float)
    n, big_n = y.size, big_f.size
    if f.size != n or n < 2 or big_n < 2:
        raise ValueError(f"need at least 2 labelled rows with a prediction each and 2 predictions in all; got "
                         f"{n} labels, {f.size} labelled predictions, {big_n} predictions")
    var_f = float(big_f.var(ddof=1))
    lam = 1.0
    if power_tuned:
        lam = float(np.clip(np.cov(y, f, ddof=1)[0, 1] / var_f, 0.0, 1.0)) if var_f > 0 else 0.0
    error = y - lam * f
    estimate = lam * float(big_f.mean()) + float(error.mean())
    overlap = float(np.cov(f, error, ddof=1)[0, 1])
    variance = lam * lam * var_f / big_n + float(error.var(ddof=1)) / n + 2 * lam * overlap / big_n
    return {"estimate": estimate, "se": float(np.sqrt(max(variance, 0.0))), "lambda": lam, "n": n, "N": big_n}


def ppi_rate(strata: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float]]], level: float = 0.95,
             power_tuned: bool = False, min_labels: int = 2) -> dict | None:
    """Prediction-powered rate over strata, each (labels, the judge on those rows, the judge on all N_h rows).

    Each stratum's `ppi_mean` is weighted by N_h / N and the variances add with the squared weights (the
    strata are sampled independently). The rate and its interval are clipped to [0, 1] (`unclipped` keeps the
    estimate). None when a stratum with rows has fewer than `min_labels` labels (at least 2): with a handful,
    errors the judge makes rarely are often not seen at all, and the CLT interval is too narrow.
    """
    parts = [(s, len(s[2])) for s in strata if len(s[2])]
    if not parts or any(len(s[0]) < max(2, min_labels) for s, _ in parts):
        return None
    total = sum(size for _, size in parts)
    fits = [(ppi_mean(*s, power_tuned=power_tuned), size / total) for s, size in parts]
    estimate = sum(w * fit["estimate"] for fit, w in fits)
    se = float(np.sqrt(sum((w * fit["se"]) ** 2 for fit, w in fits)))
    z = float(norm.ppf(0.5 + level / 2))
    return {"rate": min(1.0, max(0.0, estimate)), "unclipped": estimate,
            "ci": [max(0.0, estimate - z * se), min(1.0, estimate + z * se)], "se": se,
            "n": sum(fit["n"] for fit, _ in fits), "N": total, "lambda": [fit["lambda"] for fit, _ in fits]}


def pct(rate: float | None, ci: list[float] | None) -> str:
    if rate is None:
        return "-"
    return f"{100 * rate:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else f"{100 * rate:.1f}%"
