"""Figures: safe vs unsafe representations per layer on their first two principal components (the paper's
figure), and per-layer probe accuracy."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .files import atomic_path


def subplots(*args, figsize: tuple[float, float], **kwargs):
    """A figure and its axes without pyplot: no GUI backend, no global figure registry to close."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def safe_unsafe_rows(labels: torch.Tensor | None, pair_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row numbers of safe and unsafe responses: labelled rows, else the chosen / rejected side of pairs."""
    if labels is not None and (labels >= 0).any():
        return torch.nonzero(labels == 1).flatten(), torch.nonzero(labels == 0).flatten()
    if pair_index is not None and len(pair_index):
        return pair_index[:, 0], pair_index[:, 1]
    raise ValueError("need labels or pairs to tell safe from unsafe")


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    x = x.float() - x.float().mean(0)
    _, _, v = torch.pca_lowrank(x, q=2, center=False)
    return x @ v[:, :2]


def plot_pca(features: torch.Tensor, safe: torch.Tensor, unsafe: torch.Tensor, layer_names: list[int],
             layers: list[int], out: str, title: str = "") -> str:
    cols = len(layers)
    fig, axes = subplots(1, cols, figsize=(3.6 * cols, 3.4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        if layer not in layer_names:
            raise ValueError(f"layer {layer} is not in these features (layers {layer_names})")
        i = layer_names.index(layer)
        rows = torch.cat([safe, unsafe])
        points = pca_2d(features[rows, i])
        n = len(safe)
        ax.scatter(points[:n, 0], points[:n, 1], s=6, alpha=0.6, label="safe", color="tab:blue")
        ax.scatter(points[n:, 0], points[n:, 1], s=6, alpha=0.6, label="unsafe", color="tab:red")
        ax.set_title(f"layer {layer}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="best", fontsize=8)
    return _finish(fig, out, title)


def plot_confidence(histories: dict[str, list[float]], floor: float, out: str,
                    title: str = "Confidence gamma of the training pairs") -> str:
    """Histogram of every training pair's gamma per method: a step function shows as two spikes."""
    fig, ax = subplots(figsize=(6.5, 3.4))
    bins = [floor + i * (1 - floor) / 25 for i in range(26)] if floor < 1 else 25
    for method, gamma in histories.items():
        ax.hist(gamma, bins=bins, alpha=0.6, label=f"{method} ({len(gamma)} pairs)")
    ax.set_xlabel(f"gamma (floor {floor:g})")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _finish(fig, out)


def plot_layer_accuracy(per_layer: list[float], layer_names: list[int], out: str, gate: list[float] | None = None,
                        hybrid: float | None = None, title: str = "Per-layer probe accuracy") -> str:
    fig, ax = subplots(figsize=(6.5, 3.4))
    ax.plot(layer_names, per_layer, marker="o", ms=3, label="layer probe (val)")
    if hybrid is not None:
        ax.axhline(hybrid, color="tab:green", ls="--", label=f"hybrid reward {hybrid:.3f}")
    if gate is not None:
        ax2 = ax.twinx()
        ax2.bar(layer_names, gate, alpha=0.2, color="gray", label="gate share")
        ax2.set_ylabel("share of the vote (val mean)")
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _finish(fig, out)


def _finish(fig, out: str, title: str = "") -> str:
    """Title, layout, atomic PNG write."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120)
    return out


# ---------------------------------------------------------------- evaluation figures (rbrm eval)


def _rate_err(rate: float | None, ci: list[float] | None) -> tuple[float, float, float]:
    """(height, lower arm, upper arm) for an error bar; a missing rate draws nothing."""
    if rate is None:
        return 0.0, 0.0, 0.0
    if not ci:
        return rate, 0.0, 0.0
    return rate, max(rate - ci[0], 0.0), max(ci[1] - rate, 0.0)


def _eval_sets(summary: dict) -> dict[str, dict]:
    """Set name -> summary, whether `summary` is one set's summary or the map of several."""
    if "unsafe_rate" in summary and not isinstance(summary["unsafe_rate"], dict):
        return {summary.get("set", "prompts"): summary}
    return summary


def plot_rates(summaries: dict[str, dict], out: str, title: str = "") -> str:
    """Per model: unsafe rate on each harmful set and over-refusal on each benign set, with 95% intervals.

    `summaries` maps a model name to what `rbrm eval` wrote to summary.json (one set or several).
    """
    models = list(summaries)
    per_model = {m: _eval_sets(s) for m, s in summaries.items()}
    panels = []  # (title, [(set, metric)])
    harmful = sorted({n for sets in per_model.values() for n, s in sets.items() if not s.get("benign")})
    benign = sorted({n for sets in per_model.values() for n, s in sets.items() if s.get("benign")})
    if harmful:
        panels.append(("unsafe rate (harmful prompts)", [(n, "unsafe_rate") for n in harmful]))
    if benign:
        panels.append(("over-refusal (benign prompts)", [(n, "over_refusal_rate") for n in benign]))
    if not panels:
        raise ValueError("no prompt sets in these summaries")
    fig, axes = subplots(1, len(panels), figsize=(max(4.0, 1.2 + 0.9 * len(models) * max(
        len(p[1]) for p in panels)) * len(panels), 3.6), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, (panel_title, items) in zip(axes[0], panels):
        for k, model in enumerate(models):
            heights, lows, highs, xs = [], [], [], []
            for j, (name, metric) in enumerate(items):
                s = per_model[model].get(name)
                if s is None:
                    continue
                h, lo, hi = _rate_err(s.get(metric), s.get(metric + "_ci"))
                heights.append(h)
                lows.append(lo)
                highs.append(hi)
                xs.append(j - 0.4 + width * (k + 0.5))
            ax.bar(xs, heights, width, yerr=[lows, highs], capsize=3, color=f"C{k % 10}")
            for x, h, hi in zip(xs, heights, highs):  # a rate of 0 draws no bar: print every value
                ax.text(x, min(h + hi, 1.0) + 0.01, f"{100 * h:.0f}%", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(items)))
        ax.set_xlim(-0.6, len(items) - 0.4)
        ax.set_xticklabels([name for name, _ in items], rotation=15, ha="right", fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel("rate (95% bootstrap CI)")

    handles = [Patch(color=f"C{k % 10}", label=model) for k, model in enumerate(models)]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, out, title)


def plot_safety_vs_helpfulness(methods: dict[str, dict], out: str, title: str = "") -> str:
    """Unsafe rate (x) against helpfulness (y), one point per method with 95% intervals: a method that buys
    safety with refusals or deflections sits low on the left, not high on the left."""
    fig, ax = subplots(figsize=(5, 4))
    for name, row in methods.items():
        if row.get("helpfulness_rate") is None:
            continue
        x, xl, xh = _rate_err(row["unsafe_rate"], row.get("unsafe_rate_ci"))
        y, yl, yh = _rate_err(row["helpfulness_rate"], row.get("helpfulness_rate_ci"))
        ax.errorbar([x], [y], xerr=[[xl], [xh]], yerr=[[yl], [yh]], fmt="o", capsize=3, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("unsafe rate (harmful prompts)")
    ax.set_ylabel("helpfulness (benign prompts)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return _finish(fig, out, title or "safety against helpfulness (best: top left)")


def plot_seeds_safety_vs_helpfulness(points: dict[str, list[tuple[float, float]]], out: str, title: str = "") -> str:
    """Unsafe rate (x) against helpfulness (y): a small point per seed and a large one at each method's mean."""
    fig, ax = subplots(figsize=(5, 4))
    for k, (name, xy) in enumerate(points.items()):
        if not xy:
            continue
        xs, ys = [p[0] for p in xy], [p[1] for p in xy]
        ax.scatter(xs, ys, s=18, color=f"C{k % 10}", alpha=0.6)
        mean = (sum(xs) / len(xs), sum(ys) / len(ys))
        ax.scatter([mean[0]], [mean[1]], s=70, color=f"C{k % 10}", edgecolor="black", label=name)
        ax.annotate(name, mean, textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("unsafe rate (harmful prompts)")
    ax.set_ylabel("helpfulness (benign prompts)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, out, title or "safety against helpfulness per seed (best: top left)")


def plot_compute_curve(rows: list[dict], out: str, title: str = "") -> str:
    """Unsafe rate and helpfulness (y) against alignment FLOPs (x, log): online's curve over its numbers of
    rounds, every other method as a point (the paper's Fig. 1, at this scale)."""
    fig, axes = subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "unsafe_rate", "unsafe rate (harmful prompts)"),
                           (axes[1], "helpfulness_rate", "helpfulness (benign prompts)")):
        curve = sorted((r for r in rows if r["method"] == "online" and r.get("rounds") and r.get(key) is not None),
                       key=lambda r: r["flops"])
        if curve:
            ax.plot([r["flops"] for r in curve], [r[key] for r in curve], "o-", color="C4", label="online")
            for r in curve:
                ax.annotate(f"{r['rounds']}", (r["flops"], r[key]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        for k, r in enumerate(r for r in rows if r["method"] != "online" and r.get(key) is not None):
            ax.scatter([r["flops"]], [r[key]], s=50, color=f"C{k % 4}", label=r["method"], zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("alignment compute (FLOPs)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _finish(fig, out, title or "safety and helpfulness against compute (online: number of rounds marked)")


def plot_categories(summary: dict, out: str, title: str = "") -> str:
    """Unsafe and refusal rate per category of one prompt set (horizontal bars, 95% intervals)."""
    categories = summary.get("categories") or {}
    if not categories:
        raise ValueError("this summary has no categories")
    names = list(categories)
    fig, ax = subplots(figsize=(7.0, 1.0 + 0.45 * len(names)))
    ys = range(len(names))
    for offset, metric, color in ((-0.2, "unsafe_rate", "tab:red"), (0.2, "refusal_rate", "tab:blue")):
        bars = [_rate_err(categories[n].get(metric), categories[n].get(metric + "_ci")) for n in names]
        ax.barh([y + offset for y in ys], [b[0] for b in bars], 0.4, color=color,
                xerr=[[b[1] for b in bars], [b[2] for b in bars]], capsize=2, label=metric.replace("_", " "))
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{n} (n={categories[n]['n']})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("rate (95% bootstrap CI)")
    judge = (summary.get("judge") or {}).get("name", "?")
    ax.set_title(title or f"{summary.get('set', '')}: per category (judge {judge})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars may reach 1
    return _finish(fig, out)


# ---------------------------------------------------------------- training curves (rbrm pipeline)


def plot_training(logs: dict[str, list[dict]], out: str, title: str = "") -> str:
    """Per DPO method and logged step: the DPO reward margin, and where logged the confidence and probe accuracy.

    `logs` maps a method name to TRL's `log_history` (a list of per-step dicts).
    """
    panels = [("rewards/margins", "DPO reward margin"), ("confidence/mean", "mean confidence (gamma)"),
              ("probe/accuracy", "online probe: pair accuracy")]
    panels = [(key, name) for key, name in panels if any(key in row for log in logs.values() for row in log)]
    fig, axes = subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for k, (method, log) in enumerate(logs.items()):
            rows = [row for row in log if key in row]
            if not rows:
                continue
            steps = list(range(1, len(rows) + 1))  # online rounds restart TRL's step count: number them in order
            values = [row[key] for row in rows]
            ax.plot(steps, values, marker=".", ms=3, color=f"C{k % 10}", label=method)
            std = [row.get("confidence/std") for row in rows] if key == "confidence/mean" else None
            if std and all(s is not None for s in std):
                ax.fill_between(steps, [v - s for v, s in zip(values, std)], [v + s for v, s in zip(values, std)],
                                color=f"C{k % 10}", alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_title(name, fontsize=10)
        if key != "rewards/margins":
            ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    return _finish(fig, out, title)
