"""Compare a method of one multi-seed run with a method of another, on the same seeds and evaluation sets.

    python scripts/compare_runs.py --config configs/seeds.yaml A_RUN:METHOD B_RUN:METHOD [--out-dir runs]

A config without `seeds` compares two single runs (one seed: the intervals carry prompt variance only).

For ablations run as separate runs on a run's own stages (e.g. RBRM with `--set dpo.reward_update=false` on the
seeds run's probe, samples and pairs): prints mean rates over the seeds and the differences A - B (unsafe rate
under both judges, helpfulness) with 95% two-level bootstrap intervals over seeds and prompts, as JSON.
"""

from __future__ import annotations

import argparse
import json

from rbrm.pipeline import Pipeline, seed_configs
from rbrm.report import RunView, compare_across_runs, method_results
from rbrm.run_config import load_config


def pipelines(config_path: str, out_dir: str | None, run: str, method: str) -> list[RunView]:
    config = load_config(config_path, {"name": run, "out_dir": out_dir, "methods": [method]})
    out = []
    for seed_config in seed_configs(config) if config.seeds else [config]:
        pipeline = Pipeline(seed_config, config_path)
        pipeline.load_records([method])
        out.append(pipeline.view())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the config both runs were made with (its seeds, eval sets)")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("a", help="RUN:METHOD")
    parser.add_argument("b", help="RUN:METHOD")
    options = parser.parse_args()
    (run_a, method_a), (run_b, method_b) = (s.rsplit(":", 1) for s in (options.a, options.b))
    a = pipelines(options.config, options.out_dir, run_a, method_a)
    b = pipelines(options.config, options.out_dir, run_b, method_b)
    rates = {}
    for name, runs, method in ((options.a, a, method_a), (options.b, b, method_b)):
        rows = [method_results(p, method)[0] for p in runs]
        rates[name] = {k: sum(r[k] for r in rows) / len(rows) for k in
                       ("unsafe_rate", "second_judge_unsafe_rate", "helpfulness_rate") if all(r.get(k) is not None
                                                                                               for r in rows)}
    print(json.dumps({"seeds": [p.config.seed for p in a], "rates": rates,
                      "a_minus_b": compare_across_runs(a, method_a, b, method_b)}, indent=1))


if __name__ == "__main__":
    main()
