"""One evaluation run: generate every set's greedy answers, judge them, summarise and write the outputs."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence

from ..distributed import is_main
from ..errors import ConfigError
from ..files import write_json, write_jsonl, write_text_atomic
from ..helpfulness import helpfulness_measure
from ..judges import DEFAULT_JUDGE, Judge, get_judge
from ..plots import plot_categories
from ..render import prompt_key
from ..sampling import DecodingConfig, SamplingSettingsError, generate_responses, model_identity
from .judging import judge_cache_path, judge_rows
from .prompt_sets import PromptSet, load_set, set_dir
from .statistics import aggregate, pct, rate_with_ci

log = logging.getLogger(__name__)

SUMMARY_FORMAT = "rbrm-eval/1"
GENERATIONS_FILE = "generations.jsonl"
RESPONSES_FILE = "responses.jsonl"
COMPUTE_FILE = "compute.json"


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


def generate_sets(model, tokenizer, sets: Sequence[PromptSet], out_dir: str, settings, batch_prompts: int = 8,
                  seed: int = 0, progress: bool = True, prompts: dict | None = None) -> dict[str, tuple[list, dict]]:
    """Every set's greedy answers (`generate_set`), in the folders `evaluate` reads. Under a launcher every
    process calls it inside `rbrm.distributed.data_parallel()` and the main process then evaluates."""
    prompts = prompts or {s.name: load_set(s) for s in sets}
    generated = {}
    for s in sets:
        log.info("generating %s (%d prompts)", s.name, len(prompts[s.name]))
        generated[s.name] = generate_set(model, tokenizer, prompts[s.name], settings,
                                         set_dir(out_dir, s, len(sets) > 1), batch_prompts, seed, progress)
    return generated


def _add_compute(directory: str, stats: dict) -> dict:
    """Generation seconds, tokens and calls summed over every run that completed in this folder.

    A resumed run reports only its own share; this ledger keeps the whole cost (a killed run's share is lost).
    """
    path = os.path.join(directory, COMPUTE_FILE)
    totals = {"generation_seconds": 0.0, "generated_tokens": 0, "generate_calls": 0, "runs": 0}
    if os.path.exists(path):
        with open(path) as f:
            totals.update(json.load(f))
    if stats.get("calls") and is_main():  # under a launcher the main process keeps the ledger
        totals["generation_seconds"] = round(totals["generation_seconds"] + stats["seconds"], 3)
        totals["generated_tokens"] += stats["generated_tokens"]
        totals["generate_calls"] += stats["calls"]
        totals["runs"] += 1
        write_json(path, totals)
    return totals


def summarize_set(pset: PromptSet, rows: list[dict], judgments: list[dict], judge, *, model_info: dict,
                  settings: dict, gen_stats: dict, judge_seconds: float, resamples: int, seed: int,
                  second_judge=None, helper=None) -> tuple[dict, list]:
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
        rate, ci = rate_with_ci([bool(j["second_unsafe"]) for j in judgments], resamples, seed)
        summary["second_judge"] = {"name": second_judge.name, "version": second_judge.version,
                                   "unsafe_rate": rate, "unsafe_rate_ci": ci}
    if helper is not None and any("helpful" in j for j in judgments):
        summary["helpfulness_measure"] = {"name": helper.name, "version": helper.version,
                                          "agreement": helper.agreement,
                                          "note": "share of answers that address the question (rbrm.helpfulness)"}
    if pset.benign and judge.name == "refusal":
        summary["note"] = ("the 'refusal' judge calls every non-refusal unsafe, so unsafe_rate means nothing on "
                           "a benign set; read over_refusal_rate")
    elif pset.benign and judge.name == "states":
        summary["note"] = ("the 'states' judge was fitted on answers to harmful prompts and calls 41% of compliant "
                           "answers to XSTest's safe prompts unsafe, so unsafe_rate means little on a benign set; "
                           "read over_refusal_rate and helpfulness_rate")
    tokens = sum(int(r.get("num_tokens") or 0) for r in rows)
    summary.update({
        "judge": {"name": judge.name, "version": judge.version, "agreement": judge.agreement},
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


def safety_rates(model, tokenizer, prompts: Sequence, judge: Judge | str = DEFAULT_JUDGE, *, benign: bool = False,
                 max_new_tokens: int = 128, batch_prompts: int = 8, resamples: int = 1000, seed: int = 0,
                 progress: bool = False) -> dict:
    """`evaluate` on one in-memory prompt list, writing nothing: greedy answers, judged, with the same rates and
    bootstrap intervals (`unsafe_rate`, `refusal_rate`, per category where prompts have one; `over_refusal_rate`
    when `benign`) and the judged answers under `rows`."""
    judge = get_judge(judge) if isinstance(judge, str) else judge
    rows = generate_responses(model, tokenizer, list(prompts), n=1, settings=DecodingConfig.greedy(max_new_tokens),
                              batch_prompts=batch_prompts, seed=seed, progress=progress)
    judged = [{**row, **j} for row, j in zip(rows, judge_rows(rows, judge, progress=progress))]
    return {**aggregate(judged, benign, resamples, seed), "judge": {"name": judge.name, "version": judge.version},
            "rows": judged}


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


def write_summaries(out_dir: str, summaries: dict[str, dict], several: bool, extra: dict | None = None) -> None:
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
             helpfulness: str | None = None, second_judge=None) -> dict:
    """Generate, judge and summarise every set; returns set name -> summary.

    `judge` is a Judge or a zero-argument callable that builds one (called after generation, once
    `release_model` has freed the policy). With `helpfulness` (a measure's name, `rbrm.helpfulness`), every answer on
    a benign set also gets `helpful` (does it address the question?) and the set's summary a `helpfulness_rate`.
    `second_judge` (a Judge) judges every answer again, independently: rows get `second_unsafe` and summaries
    `second_judge` with its unsafe rate, so a finding can be checked under two judges.
    """
    start = time.perf_counter()
    settings = settings or DecodingConfig.greedy(128)
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

    generated = generate_sets(model, tokenizer, sets, out_dir, settings, batch_prompts, seed, progress, prompts)
    del model  # so that `release_model` can drop the last reference before a guard model loads
    if release_model is not None:
        release_model()
    judge = judge() if callable(judge) and not hasattr(judge, "judge") else judge

    helper = None
    if helpfulness and any(s.benign for s in sets):
        helper = helpfulness_measure(helpfulness)
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
                                        resamples=resamples, seed=seed, second_judge=second_judge, helper=helper)
        write_jsonl(os.path.join(dirs[s.name], RESPONSES_FILE), judged)
        if plot and summary.get("categories"):
            summary["categories_plot"] = plot_categories(summary, os.path.join(dirs[s.name], "categories.png"))
        summaries[s.name] = summary
    wall = time.perf_counter() - start
    for name, summary in summaries.items():
        summary["compute"]["this_run"]["wall_seconds_all_sets"] = round(wall, 3)
        write_json(os.path.join(dirs[name], "summary.json"), summary)
    write_summaries(out_dir, summaries, several, {"wall time of this run": f"{wall:.1f} s"})
    return summaries
