"""`rbrm pipeline --config CONFIG`: stages 1-4 for every method, cached and resumable, then the report.

The driver only: it asks each method (`methods.py`) for the stages it needs, runs them in order through the run
context (`run_context.py`; the stages are in `run_stages.py`, the online baseline in `online.py`), and hands the
finished records to the report (`report.py`), which only reads.

Folders under `<out_dir>/<name>/` (`rbrm.layout.RunLayout`): `probe/`, `sample/`, `rerank/`, `ranking/`,
`static_pairs/`, one per method (`train/`, `model/`, `eval/`), `online_rounds/round_K/`, then `report.md`,
`report.json` and `figures/`. Each stage is cached and resumable (`stages.py`): a finished stage with the same
key is reused, a changed one is moved aside to `<stage>.old/` and rerun, and so is everything after it. An
unfinished stage resumes where the stage itself can (sampling and evaluation keep their rows, DPO restarts from
its last checkpoint) and restarts otherwise. Compute is counted per stage (generated tokens, forward-pass tokens,
wall seconds summed over every run of the stage that ended) and summed per method over the stages it needs.
Under a launcher (the config's `launch`) every process runs this driver; `RunContext.run` decides which stages
run on every process, and the main process writes the report.
"""

from __future__ import annotations

import dataclasses
import os

from .distributed import is_main
from .methods import METHODS
from .report import RunView, write_report, write_seeds_report
from .run_config import PipelineConfig
from .run_context import RunContext
from .run_stages import STAGES, TRAINING, EvalStage, RankingStage, TrainStage


class Pipeline:
    """Runs a config's methods: their shared stages once, each method's training, each evaluation, the report."""

    def __init__(self, config: PipelineConfig, config_path: str | None = None,
                 shared: dict[str, str] | None = None):
        """`shared`: stages read from (and written to) another run's folder (see `RunContext`)."""
        self.config = config
        self.context = RunContext(config, config_path, shared)
        self.curve: list[tuple[int, Pipeline]] = []  # (rounds, the finished online run), when online_rounds

    def path(self, *parts: str) -> str:
        return self.context.layout.path(*parts)

    def shared_stages(self, methods: list[str]) -> list[str]:
        """The shared stages these methods need, each once, in the order the methods name them."""
        return list(dict.fromkeys(s for m in methods for s in self.context.stages_of(m)))

    def training_stage(self, method: str):
        """A method's own training: one DPO run on its pair stage's pairs, or its own stage (`TRAINING`)."""
        return TRAINING.get(method, TrainStage)(self.context, method)

    def run(self) -> dict:
        ctx, methods = self.context, self.config.methods
        trains = [m for m in methods if METHODS[m].trains]
        if "sample" in self.shared_stages(trains):
            ctx.training_prompts()  # a missing prompt file or a bad spec fails here, before hours of earlier stages
        for name in self.shared_stages(trains):
            ctx.run(STAGES[name](ctx))
            if name == "rerank":  # the report's ranking quality: the re-ranked samples, judged like answers
                ctx.run(RankingStage(ctx))
        for method in trains:
            ctx.run(self.training_stage(method))
        for method in methods:
            ctx.run(EvalStage(ctx, method))
        if self.config.online_rounds:
            self.curve = self.curve_runs()
            for rounds, run in self.curve:
                print(f"== online curve: {rounds} round(s) ({run.path()})", flush=True)
                run.context.models = ctx.models  # the same base model, loaded once
                run.run()
        return write_report(self.view()) if is_main() else {}

    def curve_runs(self) -> list[tuple[int, Pipeline]]:
        """One online-only pipeline per `online_rounds` entry, in <run>/curve/online_r<R>/, sharing this run's
        probe and evaluation sets."""
        online = next(m.name for m in METHODS.values() if m.online)
        runs = []
        for rounds in self.config.online_rounds or []:
            config = dataclasses.replace(self.config, methods=[online],
                                         online=dataclasses.replace(self.config.online, rounds=rounds),
                                         online_rounds=None, seeds=None, name=f"online_r{rounds}",
                                         out_dir=os.path.join(self.config.run_dir, "curve"))
            runs.append((rounds, Pipeline(config, self.context.config_path, {"probe": self.path("probe")})))
        return runs

    def load_records(self, methods: list[str] | None = None) -> None:
        """The finished stages' records of these methods (default: the config's), running nothing."""
        methods = methods or self.config.methods
        trains = [m for m in methods if METHODS[m].trains]
        needed = set(self.shared_stages(trains)) | set(trains) | {f"{m}/eval" for m in methods}
        needed |= {part for m in trains for part in self.training_stage(m).parts()}  # the online rounds
        for name in sorted(needed):
            self.context.load_record(name)
        if "rerank" in needed:  # the ranking quality, where the run has one (runs before it have none)
            self.context.load_record("ranking", required=False)

    def view(self) -> RunView:
        """What the report reads: the config, the folder, the records, each method's stages, the curve's runs."""
        ctx = self.context
        return RunView(self.config, ctx.layout, ctx.records, {m: ctx.stages_of(m) for m in self.config.methods},
                       ctx.eval_sets(), ctx.eval_measures()["second_judge"] or "none", ctx.config_path,
                       [(rounds, run.view()) for rounds, run in self.curve])

    def report_only(self) -> dict:
        """Redraw report.md/json and the figures from finished stages, running nothing."""
        self.load_records()
        self.curve = self.curve_runs()
        for _, run in self.curve:
            run.load_records()
        return write_report(self.view())


def seed_configs(config: PipelineConfig) -> list[PipelineConfig]:
    """One config per seed, each a full run in <run_dir>/seeds/seed<k>/ with that seed everywhere."""
    return [dataclasses.replace(config, seed=seed, seeds=None, name=f"seed{seed}",
                                out_dir=os.path.join(config.run_dir, "seeds")) for seed in config.seeds]


def run_seeds(config: PipelineConfig, config_path: str | None, report_only: bool = False) -> dict:
    """Every seed's pipeline (each resumes from its own cache), then the report over the seeds."""
    pipelines = []
    for seed_config in seed_configs(config):
        print(f"== seed {seed_config.seed} ({seed_config.run_dir})", flush=True)
        pipeline = Pipeline(seed_config, config_path)
        pipeline.report_only() if report_only else pipeline.run()
        pipelines.append(pipeline)
    return write_seeds_report(config, [p.view() for p in pipelines]) if is_main() else {}
