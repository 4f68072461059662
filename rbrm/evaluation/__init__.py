"""Safety evaluation (docs/method.md §5): greedy answers to prompt sets, judged, with bootstrap intervals.

In four modules: `prompt_sets` (the specs below), `statistics` (rates, intervals, ranking quality), `judging`
(the judgment cache) and `run` (`evaluate`, the loop over sets).

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

from .audit import audit_notes, audit_summary, audit_table, pooled_over_seeds, pooled_table
from .drift import DRIFT_FILE, opening_share, per_token_kl
from .judging import JUDGE_CHUNK, judge_cache_path, judge_rows
from .prompt_sets import (
    OVER_REFUSAL_SET,
    XSTEST_PROMPTS,
    PromptSet,
    check_limit,
    load_set,
    over_refusal_set,
    parse_prompt_set,
    parse_where,
    set_dir,
)
from .run import (
    COMPUTE_FILE,
    GENERATIONS_FILE,
    RESPONSES_FILE,
    SUMMARY_FORMAT,
    evaluate,
    generate_set,
    generate_sets,
    safety_rates,
    summarize_set,
    summary_table,
    write_summaries,
)
from .statistics import aggregate, bootstrap_ci, pct, ranking_quality, rate_with_ci, within_prompt_auc

__all__ = [
    "COMPUTE_FILE", "DRIFT_FILE", "GENERATIONS_FILE", "JUDGE_CHUNK", "OVER_REFUSAL_SET", "RESPONSES_FILE",
    "SUMMARY_FORMAT", "XSTEST_PROMPTS", "PromptSet", "aggregate", "audit_notes", "audit_summary", "audit_table", "pooled_over_seeds", "pooled_table",
    "bootstrap_ci", "check_limit", "evaluate", "generate_set", "generate_sets", "judge_cache_path", "judge_rows",
    "load_set", "over_refusal_set", "opening_share", "parse_prompt_set", "parse_where", "pct", "safety_rates",
    "per_token_kl", "ranking_quality", "rate_with_ci", "set_dir", "summarize_set", "summary_table",
    "within_prompt_auc", "write_summaries",
]
