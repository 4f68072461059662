"""`rbrm pipeline --config CONFIG`: stages 1-4 for every method, cached and resumable, then the report.

`--config` is the run's YAML (`rbrm.run_config`), not a file of this command's options; flags override it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..methods import METHODS
from ..pipeline import Pipeline, run_seeds
from ..run_config import load_config


@dataclass
class PipelineCommandConfig:
    config: str = field(metadata={"help": "pipeline YAML (configs/quick.yaml, compare.yaml, ...)"})
    name: str | None = field(default=None, metadata={"help": "run name (else the config's `name`, else its file "
                                                             "name)"})
    out_dir: str | None = field(default=None, metadata={"help": "parent folder of runs (else the config's `out_dir`)"})
    methods: list[str] | None = field(default=None, metadata={"help": "override the config's methods",
                                                              "choices": list(METHODS)})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (else the config's, else cuda if available)"})
    set: list[str] | None = field(default=None, metadata={
        "help": "override settings, each read as YAML, e.g. --set dpo.learning_rate=1e-4 seeds=[0,1] (repeatable)",
        "metavar": "SECTION.KEY=VALUE"})
    report_only: bool = field(default=False, metadata={"help": "only redraw report.md/json and figures from the "
                                                               "finished stages"})


def run_pipeline(args: PipelineCommandConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, {"name": args.name, "out_dir": args.out_dir, "methods": args.methods,
                                       "device": args.device, "set": args.set})
    start = time.perf_counter()
    if config.seeds:
        report = run_seeds(config, args.config, args.report_only)
    else:
        pipeline = Pipeline(config, args.config)
        report = pipeline.report_only() if args.report_only else pipeline.run()
    print(Path(config.run_dir, "report.md").read_text().split("\n## Figures")[0])
    print(f"rbrm pipeline: {config.run_dir} done in {time.perf_counter() - start:.0f} s "
          f"(report.md, report.json; {len(report['methods'])} methods)")
    return 0
