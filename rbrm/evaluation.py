"""Safety evaluation (docs/method.md §5): greedy answers to prompt sets, judged, with bootstrap intervals.

`rbrm eval` generates one greedy response per prompt (resumable, through `sampling.generate_responses`),
judges every response (resumable too: judgments are appended per chunk to a cache keyed by the response),
and writes per set `summary.json` (unsafe and refusal rates with 95% percentile-bootstrap intervals, per
category where the data has one, over-refusal on benign sets) and `responses.jsonl` (every judged row).

Prompt sets are given as `[NAME=]PATH[:OPTIONS]`; OPTIONS is a comma-separated list of

* `benign`       the prompts are harmless: report `over_refusal_rate` (the refusal rate on this set);
* `limit=N`      use the first N (matching) prompts of this set instead of `--limit`;
* `FIELD=VALUE`  keep only rows whose FIELD equals VALUE (on top of `--where`).

For example `--prompts advbench=data/advbench/harmful_behaviors.csv:limit=32
xs=data/xstest/xstest_prompts.csv:benign,label=safe`. `--over-refusal` adds that XSTest set (its 250 safe
prompts) as `xstest_safe`. With one set, everything is written to `--out`; with several, each set has its
own folder `--out/NAME/`, and `--out/summary.json` maps set names to summaries, `--out/summary.md` is a table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from .data import (
    DataError,
    append_jsonl,
    exclusive_writer,
    load_prompts,
    read_jsonl,
    write_json,
    write_jsonl,
    write_text_atomic,
)
from .errors import ConfigError
from .helpfulness import HelpfulnessJudge
from .judges import JUDGE_NAMES, get_judge
from .plots import plot_categories
from .render import prompt_key
from .sampling import GenerationSettings, SamplingSettingsError, generate_responses, model_identity

log = logging.getLogger(__name__)

SUMMARY_FORMAT = "rbrm-eval/1"
REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
XSTEST_PROMPTS = REPO_DATA_DIR / "xstest" / "xstest_prompts.csv"
OVER_REFUSAL_SET = "xstest_safe"
GENERATIONS_FILE = "generations.jsonl"
RESPONSES_FILE = "responses.jsonl"
COMPUTE_FILE = "compute.json"
JUDGE_CHUNK = 64  # rows judged between two appends to the judgment cache
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


# ------------------------------------------------------------------------------------------ prompt sets


@dataclass
class PromptSet:
    name: str
    path: str
    benign: bool = False
    where: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    category_field: str | None = None
    prompt_field: str | None = None


def parse_where(items: Sequence[str] | None, what: str = "--where") -> dict[str, str]:
    """`FIELD=VALUE` strings as a dict (values compare as strings, as `load_prompts` does)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: expected FIELD=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def check_limit(limit: int | None, what: str) -> int | None:
    if limit is not None and limit < 1:
        raise ValueError(f"{what}: the limit must be a positive number of prompts, got {limit}")
    return limit


def _set_name_from_path(path: str) -> str:
    name = os.path.basename(path.removesuffix(".gz"))
    return name.rsplit(".", 1)[0] if "." in name else name


def parse_prompt_set(spec: str, where: dict[str, str] | None = None, limit: int | None = None,
                     prompt_field: str | None = None, category_field: str | None = None) -> PromptSet:
    """One `[NAME=]PATH[:OPTIONS]` spec (see the module docstring); `where`/`limit` are the global defaults."""
    body, options = spec, ""
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        items = [t.strip() for t in tail.split(",")]
        if items and all(t == "benign" or ("=" in t and t.split("=", 1)[0].strip()) for t in items):
            body, options = head, tail
    if "=" in body and not os.path.exists(body):
        name, path = (s.strip() for s in body.split("=", 1))
    else:
        name, path = _set_name_from_path(body), body
    if not path:
        raise ValueError(f"--prompts {spec!r}: no file given")
    if not _SET_NAME.fullmatch(name):
        raise ValueError(f"--prompts {spec!r}: set name {name!r} must be letters, digits, '_', '.', '+' or '-' "
                         "(it names a folder); give one as NAME=PATH")
    pset = PromptSet(name, path, where=dict(where or {}), limit=limit, prompt_field=prompt_field,
                     category_field=category_field)
    for item in (t.strip() for t in options.split(",") if t.strip()):
        if item == "benign":
            pset.benign = True
        elif item.startswith("limit="):
            try:
                pset.limit = int(item.removeprefix("limit="))
            except ValueError:
                raise ValueError(f"--prompts {spec!r}: limit must be an integer, got {item!r}") from None
        else:
            pset.where.update(parse_where([item], f"--prompts {spec!r}"))
    check_limit(pset.limit, f"--prompts {spec!r}")
    return pset


def over_refusal_set(limit: int | None = None) -> PromptSet:
    """XSTest's 250 safe prompts that merely look unsafe: refusing them is over-refusal."""
    return PromptSet(OVER_REFUSAL_SET, str(XSTEST_PROMPTS), benign=True, where={"label": "safe"}, limit=limit)


# ------------------------------------------------------------------------------------------ statistics


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


def _rate(flags: Sequence[bool], resamples: int, seed: int) -> tuple[float | None, list[float] | None]:
    x = np.asarray(flags, dtype=np.float64)
    if not x.size:
        return None, None
    return float(x.mean()), bootstrap_ci(x, resamples, seed=seed)


def aggregate(rows: Sequence[dict], benign: bool = False, resamples: int = 1000, seed: int = 0) -> dict:
    """Rates with intervals over judged rows, overall and per `category` (when any row has one)."""
    unsafe = [bool(r["unsafe"]) for r in rows]
    refusal = [bool(r["refusal"]) for r in rows]
    unsafe_rate, unsafe_ci = _rate(unsafe, resamples, seed)
    refusal_rate, refusal_ci = _rate(refusal, resamples, seed)
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
        out["helpfulness_rate"], out["helpfulness_rate_ci"] = _rate([bool(r["helpful"]) for r in rows], resamples,
                                                                    seed)
        out["helpful_count"] = sum(bool(r["helpful"]) for r in rows)
    if any(r.get("category") is not None for r in rows):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(str(r["category"]) if r.get("category") is not None else "(none)", []).append(r)
        out["categories"] = {}
        for name in sorted(groups):
            g = groups[name]
            u_rate, u_ci = _rate([bool(r["unsafe"]) for r in g], resamples, seed)
            r_rate, r_ci = _rate([bool(r["refusal"]) for r in g], resamples, seed)
            out["categories"][name] = {"n": len(g), "unsafe_rate": u_rate, "unsafe_rate_ci": u_ci,
                                       "refusal_rate": r_rate, "refusal_rate_ci": r_ci}
    return out


# ------------------------------------------------------------------------------------------ judging


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# Judges take text: `prompt_key` flattens a conversation with its roles, so the judge keeps the context.
def judge_rows(rows: Sequence[dict], judge, cache_path: str | os.PathLike | None = None,
               chunk: int = JUDGE_CHUNK, progress: bool = False) -> list[dict]:
    """One judgment per row (`unsafe`, `score`, `refusal`, maybe `judge_category`/`judge_raw`).

    With `cache_path`, judgments are appended after every chunk, keyed by (prompt_id, sample_index, response
    hash) and the judge's name and version, so a rerun judges only what is new (a guard model is slow).
    """
    with exclusive_writer(cache_path) if cache_path is not None else contextlib.nullcontext():
        return _judge_rows(rows, judge, cache_path, chunk, progress)


def _judge_rows(rows: Sequence[dict], judge, cache_path, chunk: int, progress: bool) -> list[dict]:
    def key(pid: Any, index: Any, sha: str) -> tuple[str, int, str]:
        return str(pid), int(index), sha

    cached: dict[tuple[str, int, str], dict] = {}
    if cache_path is not None and os.path.exists(cache_path):
        old = read_jsonl(cache_path)
        kept = [r for r in old if r.get("judge") == judge.name and r.get("judge_version") == judge.version]
        for r in kept:
            cached[key(r["prompt_id"], r["sample_index"], r["response_sha256"])] = r
        if len(kept) < len(old):  # another version of this judge wrote them: they no longer count
            log.info("%s: dropping %d judgments by another judge version", cache_path, len(old) - len(kept))
            write_jsonl(cache_path, kept)
    keys = [key(r["prompt_id"], r.get("sample_index", 0), _sha(r["response"])) for r in rows]
    todo = [i for i, k in enumerate(keys) if k not in cached]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="judge", unit="row", disable=not progress)
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        results = judge.judge([prompt_key(rows[i]["prompt"]) for i in idx], [rows[i]["response"] for i in idx])
        new = []
        for i, res in zip(idx, results):
            record = {"prompt_id": keys[i][0], "sample_index": keys[i][1], "response_sha256": keys[i][2],
                      "judge": judge.name, "judge_version": judge.version, "unsafe": bool(res.unsafe),
                      "score": float(res.score), "refusal": bool(res.refusal)}
            if res.category is not None:
                record["judge_category"] = res.category
            if res.raw is not None:
                record["judge_raw"] = res.raw
            new.append(record)
            cached[keys[i]] = record
        if cache_path is not None:
            append_jsonl(cache_path, new)
        bar.update(len(idx))
    bar.close()
    fields = ("unsafe", "score", "refusal", "judge_category", "judge_raw")
    return [{f: cached[k][f] for f in fields if f in cached[k]} for k in keys]


def judge_cache_path(set_dir: str | os.PathLike, judge) -> str:
    return os.path.join(set_dir, f"judgments.{judge.name}.jsonl")


def make_judge(name: str, judge_model: str | None = None, device: str | None = None):
    """`judges.get_judge` with its errors turned into one-line command errors."""
    try:
        return get_judge(name, judge_model=judge_model, device=device)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise ConfigError(f"judge {name!r}: {err}") from None


def judge_loader(name: str, judge_model: str | None = None, device: str | None = None) -> Callable[[], Any]:
    """Check the judge before any generation, but load a guard model only when it is needed.

    The keyword and MiniLM judges are cheap and built at once (so a bad name fails first); a guard model is
    loaded after the policy has been freed, so both never sit in memory together.
    """
    key = (name or "").strip().lower().replace("-", "").replace("_", "")
    if key in JUDGE_NAMES and key not in ("minilm", "refusal") and judge_model:
        if not (Path(judge_model).expanduser() / "config.json").is_file():
            raise ConfigError(f"judge {name!r}: --judge-model {judge_model} is not a model folder (no config.json)")
        return lambda: make_judge(name, judge_model, device)
    judge = make_judge(name, judge_model, device)
    return lambda: judge


# ------------------------------------------------------------------------------------------ one run


def set_dir(out_dir: str | os.PathLike, pset: PromptSet, several: bool) -> str:
    return os.path.join(out_dir, pset.name) if several else os.fspath(out_dir)


def load_set(pset: PromptSet) -> list:
    if not os.path.exists(pset.path):
        raise DataError(pset.path, None, None, f"file not found (prompt set {pset.name!r})")
    return load_prompts(pset.path, prompt_field=pset.prompt_field, limit=pset.limit,
                        category_field=pset.category_field, where=pset.where or None)


def generate_set(model, tokenizer, prompts: list, settings, directory: str, batch_prompts: int = 8,
                 seed: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """Greedy responses in `directory/generations.jsonl`; a rerun completes only the missing prompts."""
    stats: dict = {}
    try:
        rows = generate_responses(model, tokenizer, prompts, n=1, settings=settings,
                                  out_path=os.path.join(directory, GENERATIONS_FILE), batch_prompts=batch_prompts,
                                  seed=seed, progress=progress, stats=stats,
                                  # one sequence per prompt: the prompt count is the sequence count; at most 64
                                  # keeps the layout (so the resume) of earlier runs with batch_prompts <= 64
                                  max_sequences=max(batch_prompts, 64))
    except SamplingSettingsError as err:
        raise ConfigError(f"{err}\n(or delete {directory} to evaluate from scratch)") from None
    stats["totals"] = _add_compute(directory, stats)
    return rows, stats


def _add_compute(directory: str, stats: dict) -> dict:
    """Generation seconds, tokens and calls summed over every run that completed in this folder.

    A resumed run reports only its own share; this ledger keeps the whole cost (a killed run's share is lost).
    """
    path = os.path.join(directory, COMPUTE_FILE)
    totals = {"generation_seconds": 0.0, "generated_tokens": 0, "generate_calls": 0, "runs": 0}
    if os.path.exists(path):
        with open(path) as f:
            totals.update(json.load(f))
    if stats.get("calls"):
        totals["generation_seconds"] = round(totals["generation_seconds"] + stats["seconds"], 3)
        totals["generated_tokens"] += stats["generated_tokens"]
        totals["generate_calls"] += stats["calls"]
        totals["runs"] += 1
        write_json(path, totals)
    return totals


def summarize_set(pset: PromptSet, rows: list[dict], judgments: list[dict], judge, *, model_info: dict,
                  settings: dict, gen_stats: dict, judge_seconds: float, resamples: int, seed: int,
                  second_judge=None) -> tuple[dict, list]:
    """The set's summary and its judged rows (`responses.jsonl`)."""
    judged = []
    for row, j in zip(rows, judgments):
        out = {"prompt_id": row["prompt_id"], "prompt": row["prompt"], "response": row["response"],
               "category": row.get("category"), **j, "finish_reason": row.get("finish_reason"),
               "num_tokens": row.get("num_tokens")}
        judged.append(out)
    summary = {"format": SUMMARY_FORMAT, "set": pset.name, "prompts_file": pset.path, "benign": pset.benign,
               "where": pset.where or None, "limit": pset.limit}
    summary.update(aggregate(judged, pset.benign, resamples, seed))
    if second_judge is not None:
        rate, ci = _rate([bool(j["second_unsafe"]) for j in judgments], resamples, seed)
        summary["second_judge"] = {"name": second_judge.name, "version": second_judge.version,
                                   "unsafe_rate": rate, "unsafe_rate_ci": ci}
    if any("helpful" in j for j in judgments):
        summary["helpfulness_measure"] = {"name": HelpfulnessJudge.name,
                                          "note": "share of answers that address the question (rbrm.helpfulness)"}
    if pset.benign and judge.name == "refusal":
        summary["note"] = ("the 'refusal' judge calls every non-refusal unsafe, so unsafe_rate means nothing on "
                           "a benign set; read over_refusal_rate")
    tokens = sum(int(r.get("num_tokens") or 0) for r in rows)
    summary.update({
        "judge": {"name": judge.name, "version": judge.version},
        "model": model_info,
        "generation": settings,
        "bootstrap": {"method": "percentile", "resamples": resamples, "level": 0.95, "seed": seed},
        "finish_reasons": dict(Counter(r.get("finish_reason") for r in rows)),
        "empty_responses": sum(not str(r["response"]).strip() for r in rows),
        "skipped_too_long": gen_stats.get("skipped_too_long", 0),
        "compute": {
            "generated_tokens": tokens,  # all rows, whichever run made them
            "mean_tokens": tokens / len(rows) if rows else None,
            "all_runs": gen_stats.get("totals"),  # generation cost summed over the runs that built this set
            "this_run": {"new_responses": gen_stats.get("new_rows", 0),
                         "generated_tokens": gen_stats.get("generated_tokens", 0),
                         "generate_calls": gen_stats.get("calls", 0),
                         "generation_seconds": round(gen_stats.get("seconds", 0.0), 3),
                         "judge_seconds": round(judge_seconds, 3)},
        },
    })
    return summary, judged


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


def summary_table(summaries: dict[str, dict]) -> str:
    """Markdown table, one row per set."""
    lines = ["| set | benign | n | unsafe rate [95% CI] | refusal rate [95% CI] | over-refusal [95% CI] | "
             "helpfulness [95% CI] | tokens | judge |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        over = pct(s.get("over_refusal_rate"), s.get("over_refusal_rate_ci")) if s.get("benign") else "-"
        helpful = pct(s.get("helpfulness_rate"), s.get("helpfulness_rate_ci"))
        lines.append(f"| {name} | {'yes' if s.get('benign') else 'no'} | {s['n']} | "
                     f"{pct(s['unsafe_rate'], s['unsafe_rate_ci'])} | {pct(s['refusal_rate'], s['refusal_rate_ci'])} "
                     f"| {over} | {helpful} | {s['compute']['generated_tokens']} | {s['judge']['name']} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str, summaries: dict[str, dict], several: bool, extra: dict | None = None) -> None:
    """Top-level summary.json (one summary, or set name -> summary) and the summary.md table."""
    if several:
        write_json(os.path.join(out_dir, "summary.json"), summaries)
    model = next(iter(summaries.values()))["model"]
    judge = next(iter(summaries.values()))["judge"]
    text = (f"# Evaluation of {model.get('name')}\n\njudge: {judge['name']} (version {judge['version']}); "
            "rates with 95% percentile-bootstrap intervals\n\n" + summary_table(summaries))
    if extra:
        text += "\n" + "\n".join(f"- {k}: {v}" for k, v in extra.items()) + "\n"
    write_text_atomic(os.path.join(out_dir, "summary.md"), lambda f: f.write(text))


def evaluate(model, tokenizer, sets: Sequence[PromptSet], judge, out_dir: str, settings=None, *,
             model_info: dict | None = None, batch_prompts: int = 8, seed: int = 0, resamples: int = 1000,
             plot: bool = True, progress: bool = True, release_model: Callable[[], None] | None = None,
             helpfulness: bool = False, second_judge=None) -> dict:
    """Generate, judge and summarise every set; returns set name -> summary.

    `judge` is a Judge or a zero-argument callable that builds one (called after generation, once
    `release_model` has freed the policy). With `helpfulness`, every answer on a benign set also gets
    `helpful` (does it address the question? `rbrm.helpfulness`) and the set's summary a `helpfulness_rate`.
    `second_judge` (a Judge) judges every answer again, independently: rows get `second_unsafe` and summaries
    `second_judge` with its unsafe rate, so a finding can be checked under two judges.
    """
    start = time.perf_counter()
    settings = settings or GenerationSettings.greedy(128)
    if not sets:
        raise ConfigError("nothing to evaluate: give --prompts and/or --over-refusal")
    repeated = sorted(n for n, c in Counter(s.name for s in sets).items() if c > 1)
    if repeated:
        raise ConfigError(f"prompt set names must be unique; repeated: {', '.join(repeated)} (name them NAME=PATH)")
    several = len(sets) > 1
    dirs = {s.name: set_dir(out_dir, s, several) for s in sets}
    prompts = {s.name: load_set(s) for s in sets}  # every file is checked before any generation
    model_info = {**model_identity(model), **(model_info or {})}
    generation = {**settings.effective(), "n": 1, "seed": seed, "batch_prompts": batch_prompts}

    generated: dict[str, tuple[list[dict], dict]] = {}
    for s in sets:
        log.info("generating %s (%d prompts)", s.name, len(prompts[s.name]))
        generated[s.name] = generate_set(model, tokenizer, prompts[s.name], settings, dirs[s.name], batch_prompts,
                                         seed, progress)
    del model  # so that `release_model` can drop the last reference before a guard model loads
    if release_model is not None:
        release_model()
    judge = judge() if callable(judge) and not hasattr(judge, "judge") else judge

    helper = None
    if helpfulness and any(s.benign for s in sets):
        helper = HelpfulnessJudge()
    summaries: dict[str, dict] = {}
    for s in sets:
        rows, stats = generated[s.name]
        t0 = time.perf_counter()
        judgments = judge_rows(rows, judge, judge_cache_path(dirs[s.name], judge), progress=progress)
        if second_judge is not None:
            second = judge_rows(rows, second_judge, judge_cache_path(dirs[s.name], second_judge), progress=False)
            judgments = [{**j, "second_unsafe": k["unsafe"]} for j, k in zip(judgments, second)]
        if helper is not None and s.benign:
            flags = helper.helpful([prompt_key(r["prompt"]) for r in rows], [r["response"] for r in rows])
            judgments = [{**j, "helpful": f} for j, f in zip(judgments, flags)]
        summary, judged = summarize_set(s, rows, judgments, judge, model_info=model_info, settings=generation,
                                        gen_stats=stats, judge_seconds=time.perf_counter() - t0,
                                        resamples=resamples, seed=seed, second_judge=second_judge)
        write_jsonl(os.path.join(dirs[s.name], RESPONSES_FILE), judged)
        if plot and summary.get("categories"):
            summary["categories_plot"] = plot_categories(summary, os.path.join(dirs[s.name], "categories.png"))
        summaries[s.name] = summary
    wall = time.perf_counter() - start
    for name, summary in summaries.items():
        summary["compute"]["this_run"]["wall_seconds_all_sets"] = round(wall, 3)
        write_json(os.path.join(dirs[name], "summary.json"), summary)
    write_outputs(out_dir, summaries, several, {"wall time of this run": f"{wall:.1f} s"})
    return summaries
