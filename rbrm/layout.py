"""Every path in a run folder, in one place: the stages write there and the report reads there.

`<out_dir>/<name>/` holds one folder per stage (`probe/`, `sample/`, `rerank/`, `static_pairs/`, ...), one per
method (`train/`, `model/`, `dpo_log.json`, `eval/`), `online_rounds/round_K/`, the online curve's runs under
`curve/`, the seeds' runs under `seeds/`, and `report.md`, `report.json` and `figures/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# The confidence trainer's record of each pair's confidence over training, in its output folder.
CONFIDENCE_FILE = "rbrm_confidence.json"


@dataclass(frozen=True)
class RunLayout:
    """A run folder. `shared` maps a stage to another run's folder for it (the online curve's runs train from
    the main run's hybrid reward, {"probe": <run>/probe})."""

    root: str
    shared: dict[str, str] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        if parts and parts[0] in self.shared:
            return os.path.join(self.shared[parts[0]], *parts[1:])
        return os.path.join(self.root, *parts)

    def stage(self, name: str) -> str:
        """A stage's folder; `a/b` names a stage inside another's folder (`rbrm/eval`)."""
        return self.path(*name.split("/"))

    def reward_model(self, probe: str = "probe") -> str:
        return self.path(probe, "reward_model")

    def pairs(self, stage: str) -> str:
        return self.path(stage, "pairs.jsonl")

    def model(self, method: str) -> str:
        return self.path(method, "model")

    def train_dir(self, method: str) -> str:
        return self.path(method, "train")

    def dpo_log(self, method: str) -> str:
        return self.path(method, "dpo_log.json")

    def confidence(self, method: str) -> str:
        return self.path(method, "train", CONFIDENCE_FILE)

    def eval_dir(self, method: str) -> str:
        return self.path(method, "eval")

    def online_round(self, r: int, *parts: str) -> str:
        return self.path("online_rounds", f"round_{r}", *parts)

    @property
    def ranking_quality(self) -> str:
        """The `ranking` stage's verdicts on the re-ranked samples, which the report reads."""
        return self.path("ranking", "ranking_quality.json")

    def figure(self, name: str) -> str:
        return self.path("figures", name)

    @property
    def report_json(self) -> str:
        return self.path("report.json")

    @property
    def report_md(self) -> str:
        return self.path("report.md")


def sample_files(directory: str, refusal_prefills: int) -> list[str]:
    """A sample stage's files: the policy's own samples, then one file per refusal opening."""
    return [os.path.join(directory, "samples.jsonl")] + [
        os.path.join(directory, f"prefilled_{j}.jsonl") for j in range(refusal_prefills)]
