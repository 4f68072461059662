"""`rbrm pipeline --config CONFIG`: stages 1-4 for every method, cached and resumable, then the report.

`--config` is the run's YAML (`rbrm.run_config`), not a file of this command's options; flags override it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import init, is_main, launched
from ..methods import METHODS
from ..pipeline import Pipeline, run_seeds
from ..run_config import LaunchSection, PipelineConfigError, load_config


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


LAUNCHED_BY_RBRM = "RBRM_LAUNCHED"  # set in the launcher's environment, so a child never launches again


def launcher_command(args: PipelineCommandConfig, launch: LaunchSection) -> list[str]:
    """This command again, under the config's launcher, with `launch.processes` processes on this machine."""
    again = ["-m", "rbrm.cli", "pipeline", "--config", args.config]
    for flag, value in (("--name", args.name), ("--out_dir", args.out_dir), ("--device", args.device)):
        again += [flag, value] if value is not None else []
    again += ["--methods", *args.methods] if args.methods else []
    again += ["--set", *args.set] if args.set else []
    if launch.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(launch.processes), *again]
    # Without a config file, `--multi_gpu` is accelerate's data-parallel launch (torch's launcher; gloo on CPUs).
    config_file = ["--config_file", launch.accelerate_config] if launch.accelerate_config else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *config_file, "--num_processes",
            str(launch.processes), *again]


def run_pipeline(args: PipelineCommandConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, {"name": args.name, "out_dir": args.out_dir, "methods": args.methods,
                                       "device": args.device, "set": args.set})
    wants_processes = config.launch.launcher and config.launch.processes > 1 and not args.report_only
    if wants_processes and not launched():
        if os.environ.get(LAUNCHED_BY_RBRM):  # the launcher started one plain process: never launch again from it
            raise PipelineConfigError(f"{config.launch.launcher} started this process alone, not as one of "
                                      f"{config.launch.processes}: check launch.accelerate_config")
        command = launcher_command(args, config.launch)
        print("rbrm pipeline: " + " ".join(command), flush=True)
        return subprocess.run(command, env={**os.environ, LAUNCHED_BY_RBRM: "1"}).returncode
    init()
    start = time.perf_counter()
    if config.seeds:
        report = run_seeds(config, args.config, args.report_only)
    else:
        pipeline = Pipeline(config, args.config)
        report = pipeline.report_only() if args.report_only else pipeline.run()
    if not is_main():
        return 0
    print(Path(config.run_dir, "report.md").read_text().split("\n## Figures")[0])
    print(f"rbrm pipeline: {config.run_dir} done in {time.perf_counter() - start:.0f} s "
          f"(report.md, report.json; {len(report['methods'])} methods)")
    return 0
