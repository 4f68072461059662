"""`rbrm eval`, `rbrm eval plot` and `rbrm judge`: each a config dataclass and a function that takes it."""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, DataError
from ..evaluation import (
    OVER_REFUSAL_SET,
    SUMMARY_FORMAT,
    PromptSet,
    check_limit,
    evaluate,
    load_set,
    over_refusal_set,
    parse_prompt_set,
    parse_where,
)
from ..files import iter_records, write_jsonl
from ..formats import read_prompt, read_str
from ..helpfulness import DEFAULT_HELPFULNESS, HELPFULNESS_MEASURES, helpfulness_measure
from ..judges import DEFAULT_JUDGE, get_judge, judge_loader
from ..models import DEFAULT_MODEL, load_model, resolve_model
from ..plots import plot_rates
from ..render import Prompt, prompt_key
from ..sampling import DecodingConfig


@dataclass
class EvalConfig:
    out: str = field(metadata={"help": "output folder; rerun the same command to resume"})
    prompts: list[str] = field(default_factory=list, metadata={
        "help": "prompt sets, each [NAME=]PATH[:OPTIONS] with OPTIONS a comma list of 'benign', 'limit=N', "
                "'FIELD=VALUE' (row filter); e.g. xs=data/xstest/xstest_prompts.csv:benign,label=safe. "
                "Give several after one --prompts or repeat the flag"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "alias, folder, .gguf or hub id"})
    over_refusal: bool = field(default=False, metadata={
        "help": f"also evaluate XSTest's 250 safe prompts as the benign set {OVER_REFUSAL_SET!r}"})
    helpfulness: bool = field(default=False, metadata={
        "help": "on every benign set, also report the share of answers that address the question "
                "(helpfulness_rate; sees deflections that the keyword over-refusal rate misses)"})
    helpfulness_measure: str = field(default=DEFAULT_HELPFULNESS, metadata={
        "choices": list(HELPFULNESS_MEASURES), "help": "which helpfulness measure (rbrm.helpfulness)"})
    prompt_field: str | None = field(default=None, metadata={"help": "column holding the prompt (default: detect)"})
    category_field: str | None = field(default=None, metadata={
        "help": "column holding the category (default: detect, e.g. Salad-Bench's 1-category)"})
    where: list[str] | None = field(default=None, metadata={
        "help": "FIELD=VALUE filters for every --prompts set (not the --over-refusal set)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts of each set"})
    judge: str = field(default=DEFAULT_JUDGE, metadata={
        "help": "states (default), minilm, refusal, llamaguard[1-3] or mdjudge (these two need --judge-model)"})
    judge_model: str | None = field(default=None, metadata={"help": "local guard model folder"})
    judge_device: str | None = field(default=None, metadata={"help": "device for the judge (default: auto)"})
    max_new_tokens: int = 128
    repetition_penalty: float = 1.0
    batch_prompts: int = field(default=8, metadata={"help": "prompts per generate call"})
    seed: int = field(default=0, metadata={"help": "seeds the bootstrap (greedy decoding needs none)"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95%% intervals"})
    plot: bool = field(default=True, metadata={"help": "draw categories.png where the data has categories"})
    dtype: str = "auto"
    device: str | None = None


def sets_from_config(config: EvalConfig) -> list[PromptSet]:
    try:
        check_limit(config.limit, "--limit")
        where = parse_where(config.where)
        sets = [parse_prompt_set(spec, where, config.limit, config.prompt_field, config.category_field)
                for spec in config.prompts]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.over_refusal:
        sets.append(over_refusal_set(config.limit))
    return sets


def run_eval(config: EvalConfig) -> dict:
    sets = sets_from_config(config)
    if not sets:
        raise ConfigError("nothing to evaluate; give --prompts FILE and/or --over-refusal")
    if config.max_new_tokens < 1 or config.bootstrap < 1 or config.batch_prompts < 1:
        raise ConfigError("--max-new-tokens, --bootstrap and --batch-prompts must be >= 1")
    make = judge_loader(config.judge, config.judge_model, config.judge_device)
    for pset in sets:  # every prompt file is read (and any error shown) before the model takes seconds to load
        load_set(pset)
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    holder = {"model": model}
    del model

    def release() -> None:
        holder.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    settings = DecodingConfig.greedy(config.max_new_tokens, config.repetition_penalty)
    summaries = evaluate(holder["model"], tokenizer, sets, make, config.out, settings,
                         model_info={"name": config.model, "path": resolve_model(config.model)},
                         batch_prompts=config.batch_prompts, seed=config.seed, resamples=config.bootstrap,
                         plot=config.plot, release_model=release,
                         helpfulness=config.helpfulness_measure if config.helpfulness else None)
    print(open(os.path.join(config.out, "summary.md")).read(), end="")
    return 0 if summaries else 1




# ------------------------------------------------------------------------------------------ rbrm judge


@dataclass
class JudgeConfig:
    data: str = field(metadata={"help": "jsonl/json/csv with a prompt and a response per row"})
    out: str = field(metadata={"help": "output .jsonl: every row with unsafe, score and refusal added"})
    judge: str = field(default=DEFAULT_JUDGE, metadata={
        "help": "states (default), minilm, refusal, llamaguard[1-3], mdjudge"})
    judge_model: str | None = field(default=None, metadata={"help": "local guard model folder"})
    judge_device: str | None = None
    helpfulness: bool = field(default=False, metadata={
        "help": "instead of safety, write `helpful` (does the answer address the benign question?) and `score`"})
    helpfulness_measure: str = field(default=DEFAULT_HELPFULNESS, metadata={
        "choices": list(HELPFULNESS_MEASURES), "help": "which helpfulness measure (rbrm.helpfulness)"})
    prompt_field: str = "prompt"
    response_field: str = "response"
    limit: int | None = field(default=None, metadata={"help": "judge only the first N rows"})


def read_prompt_responses(path: str, prompt_field: str = "prompt", response_field: str = "response",
               limit: int | None = None) -> list[tuple[dict, Prompt, str]]:
    """(row, prompt, response) per row; a bad row raises DataError with its file, line and field."""
    if not os.path.exists(path):
        raise DataError(path, None, None, "file not found")
    out = []
    for line, row in iter_records(path):
        if limit is not None and len(out) >= limit:
            break
        out.append((row, read_prompt(row, prompt_field, path, line), read_str(row, response_field, path, line)))
    if not out:
        raise DataError(path, None, None, "no rows")
    return out


def run_judge(config: JudgeConfig) -> int:
    try:
        check_limit(config.limit, "--limit")
        pairs = read_prompt_responses(config.data, config.prompt_field, config.response_field, config.limit)
    except DataError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.helpfulness:
        return _run_helpfulness(config, pairs)
    judge = get_judge(config.judge, config.judge_model, config.judge_device)
    t0 = time.perf_counter()
    results = judge.judge([prompt_key(p) for _, p, _ in pairs], [r for _, _, r in pairs])
    rows = []
    for (row, _, _), res in zip(pairs, results):
        extra = {"unsafe": bool(res.unsafe), "score": float(res.score), "refusal": bool(res.refusal)}
        if res.category is not None:
            extra["judge_category"] = res.category
        rows.append({**row, **extra})
    write_jsonl(config.out, rows)
    unsafe = sum(r["unsafe"] for r in rows)
    refusals = sum(r["refusal"] for r in rows)
    empty = sum(not r.strip() for _, _, r in pairs)
    print(f"{config.out}: {len(rows)} rows judged by {judge.name} (version {judge.version}) in "
          f"{time.perf_counter() - t0:.1f} s; unsafe {unsafe} ({100 * unsafe / len(rows):.1f}%), "
          f"refusals {refusals} ({100 * refusals / len(rows):.1f}%)"
          + (f"; {empty} empty responses judged safe" if empty else ""))
    return 0


def _run_helpfulness(config: JudgeConfig, pairs: list[tuple[dict, Prompt, str]]) -> int:
    helper = helpfulness_measure(config.helpfulness_measure, device=config.judge_device)
    t0 = time.perf_counter()
    scores = helper.scores([prompt_key(p) for _, p, _ in pairs], [r for _, _, r in pairs])
    rows = [{**row, "helpful": bool(s >= helper.threshold), "score": float(s)} for (row, _, _), s in zip(pairs, scores)]
    write_jsonl(config.out, rows)
    helpful = sum(r["helpful"] for r in rows)
    print(f"{config.out}: {len(rows)} rows judged by {helper.name} (version {helper.version}) in "
          f"{time.perf_counter() - t0:.1f} s; helpful {helpful} ({100 * helpful / len(rows):.1f}%)")
    return 0


# ------------------------------------------------------------------------------------------ rbrm eval plot


@dataclass
class EvalPlotConfig:
    runs: list[str] = field(metadata={"help": "NAME=DIR of `rbrm eval` outputs (DIR alone: its folder name)"})
    out: str = field(metadata={"help": "output PNG"})


def load_summary(directory: str) -> dict[str, dict]:
    """Set name -> summary from an `rbrm eval` folder (one set or several)."""
    path = os.path.join(directory, "summary.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found; is {directory} an `rbrm eval --out` folder?")
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and data.get("format") == SUMMARY_FORMAT:
        return {data["set"]: data}
    if isinstance(data, dict) and data and all(isinstance(v, dict) and v.get("format") == SUMMARY_FORMAT
                                               for v in data.values()):
        return data
    raise ConfigError(f"{path}: not a summary written by `rbrm eval`")


def run_eval_plot(config: EvalPlotConfig) -> int:
    runs: dict[str, dict] = {}
    for spec in config.runs:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = os.path.basename(os.path.normpath(spec)), spec
        if name in runs:
            raise ConfigError(f"run name {name!r} given twice")
        runs[name] = load_summary(directory)
    print(plot_rates(runs, config.out))
    return 0


