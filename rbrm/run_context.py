"""What every stage of a run shares: the config, the run folder (`RunLayout`), the device, the base policy loaded
once, the finished stages' records, and the settings each stage resolves the same way (precision, DPO arguments,
training and evaluation prompts). The stages themselves are in `run_stages.py`; the driver in `pipeline.py`."""

from __future__ import annotations

import dataclasses
import os

from . import __version__
from .distributed import barrier, broadcast, data_parallel, is_main, world_size
from .dpo import ConfidenceDPOConfig, machine_defaults
from .evaluation import load_set, over_refusal_set, parse_prompt_set
from .formats import load_prompts
from .judges import JUDGE_NAMES, get_judge
from .layout import RunLayout
from .methods import METHODS
from .models import default_device, load_model, resolve_dtype, resolve_model
from .online import trainable_policy
from .render import matching_key, to_messages
from .rerank import BENIGN_PREFIX, ClassifierReward, rerank_file, write_rerank_outputs
from .run_config import PipelineConfig, PipelineConfigError
from .stages import model_digest, read_json, run_stage


class RunContext:
    """The shared state of one run; stages read it and `run(stage)` records what they finished."""

    def __init__(self, config: PipelineConfig, config_path: str | None = None, shared: dict[str, str] | None = None):
        """`shared`: stages read from (and written to) another run's folder, e.g. {"probe": <run>/probe} for the
        online curve's runs, which train from the main run's hybrid reward."""
        self.config, self.config_path = config, config_path
        self.layout = RunLayout(config.run_dir, dict(shared or {}))
        self.device = config.device or default_device()
        self.model_path = resolve_model(config.model)
        self.records: dict[str, dict] = {}
        self.models: dict = {}  # loaded once: the base policy per precision, the frozen reference
        self.scorers: dict = {}  # online.scorer, loaded once
        self.eval_prompt_keys: set[str] | None = None
        self.excluded_training_prompts: int | None = None

    # ------------------------------------------------------------------------------------ running

    def run(self, stage) -> dict:
        """Run `stage` (its `before()` stages first) unless it finished with the same key; keep its record.

        Under a launcher (`rbrm.distributed`) the main process keeps the stage folder and its record. A
        `parallel` stage runs on every process, inside `data_parallel()`; any other runs on the main process
        while the others wait for its record."""
        for earlier in stage.before():
            self.run(earlier)
        directory, inputs = self.layout.stage(stage.name), stage.inputs()
        if world_size() == 1:
            record = run_stage(directory, inputs, stage.run, stage.name)
        elif is_main():
            record = broadcast(run_stage(directory, inputs, self.on_every_process(stage), stage.name))
        else:  # the main process says "run" (True) for a parallel stage it runs, then sends the record
            record = broadcast()
            if record is True:
                with data_parallel():
                    stage.run(directory)
                record = broadcast()
        self.records[stage.name] = record
        return record

    @staticmethod
    def on_every_process(stage):
        """The main process's body of a stage: a parallel one first tells the others to join it."""
        if not stage.parallel:
            return stage.run

        def body(directory: str) -> dict:
            broadcast(True)
            with data_parallel():
                return stage.run(directory)

        return body

    def load_record(self, name: str, required: bool = True) -> dict | None:
        """A finished stage's record, running nothing; None for an unfinished stage that is not `required`."""
        record = read_json(os.path.join(self.layout.stage(name), "stage.json"))
        if record is None:
            if not required:
                return None
            raise PipelineConfigError(f"stage {name} has not finished in {self.layout.root}")
        self.records[name] = record
        return record

    def key_of(self, name: str) -> str:
        return self.records[name]["key"]

    # ------------------------------------------------------------------------------------ models

    def base_inputs(self) -> dict:
        """In every key: the model's files and rbrm's version (the code itself is not hashed)."""
        return {"model": self.model_path, "model_files": model_digest(self.model_path), "rbrm": __version__}

    def resolved_dtype(self, dtype: str | None) -> str:
        """The precision a stage's `dtype` runs in here, for its stage key: `auto` is fp32 on one CPU, bf16 on
        another (measured), and the figures differ."""
        return str(resolve_dtype(dtype, self.device, inference=True))

    def inference_model(self, dtype: str = "auto"):
        """(model, tokenizer) of the base policy for sampling, scoring and evaluation, loaded once."""
        if dtype not in self.models:
            self.models[dtype] = load_model(self.model_path, dtype=dtype, device=self.device)
        return self.models[dtype]

    def training_model(self):
        """A fresh trainable copy of the base policy (fp32 on CPU)."""
        return trainable_policy(self.model_path, None, bool(self.config.lora), self.device)

    def reference_model(self):
        """The frozen initial policy, the reference of every online round (not the previous round's policy)."""
        if "reference" not in self.models:
            self.models["reference"] = self.training_model().eval().requires_grad_(False)
        return self.models["reference"]

    # ------------------------------------------------------------------------------------ prompts

    def training_prompts(self) -> list:
        """The harmful sampling prompts, then the optional benign ones (the paper's "general" samples, ids
        prefixed `benign:`) and borderline ones, each minus any evaluation prompt (case/space-insensitive), then
        `skip`/`limit`."""
        s = self.config.sample
        evaluation, out, self.excluded_training_prompts = self.evaluation_keys(), [], 0

        def not_evaluated(prompts: list) -> list:
            kept = [p for p in prompts if matching_key(p.prompt) not in evaluation]
            self.excluded_training_prompts += len(prompts) - len(kept)
            return kept

        for prefix in ("", "benign_"):
            if not getattr(s, prefix + "prompts"):
                continue
            kept = not_evaluated(load_prompts(getattr(s, prefix + "prompts"),
                                              prompt_field=getattr(s, prefix + "prompt_field"),
                                              where=getattr(s, prefix + "where")))
            skip, limit = getattr(s, prefix + "skip"), getattr(s, prefix + "limit")
            kept = kept[skip:skip + limit] if limit else kept[skip:]
            out += [dataclasses.replace(p, id=f"{BENIGN_PREFIX}{p.id}") for p in kept] if prefix else kept
        for pset in self.borderline_sets():  # benign too; the set's name keeps their ids apart from the others
            kept = not_evaluated(load_set(dataclasses.replace(pset, limit=None)))
            out += [dataclasses.replace(p, id=f"{BENIGN_PREFIX}{pset.name}:{p.id}") for p in kept[:pset.limit]]
        return out

    def borderline_sets(self) -> list:
        """`sample.borderline_prompts`: benign pool prompts that sound harmful, one prompt set per spec."""
        return [parse_prompt_set(spec) for spec in self.config.sample.borderline_prompts or []]

    def evaluation_keys(self) -> set[str]:
        if self.eval_prompt_keys is None:
            held_out = self.eval_sets() + [parse_prompt_set(spec) for spec in self.config.sample.exclude or []]
            self.eval_prompt_keys = {matching_key(p.prompt) for pset in held_out for p in load_set(pset)}
        return self.eval_prompt_keys

    def eval_sets(self) -> list:
        e = self.config.eval
        sets = [parse_prompt_set(spec) for spec in e.prompts]
        if e.over_refusal:
            sets.append(over_refusal_set(e.over_refusal_limit))
        return sets

    # ------------------------------------------------------------------------------------ methods

    def stages_of(self, method: str) -> tuple[str, ...]:
        """The shared stages a method needs: its `Method.stages`, and the helpfulness reward where it ranks pairs."""
        stages = METHODS[method].stages
        if self.config.helpfulness_probe and "rerank" in stages:
            stages = (*stages[:stages.index("rerank")], "helpfulness_probe", *stages[stages.index("rerank"):])
        return stages

    def helpfulness_reward(self) -> str | None:
        """The helpfulness reward's folder when the run has one (it ranks the benign pool prompts)."""
        return self.layout.reward_model("helpfulness_probe") if self.config.helpfulness_probe else None

    def dpo_args(self, method: str, output_dir: str, **overrides) -> ConfidenceDPOConfig:
        """The method's DPO settings. Under a launcher of W processes each takes 1/W of
        `per_device_train_batch_size`, which in a run config is the batch of one process: the optimiser sees the
        same pairs per step on any number of processes, and the stage key does not change."""
        processes = world_size()
        if processes > 1 and "per_device_train_batch_size" not in overrides:
            batch = int(self.config.dpo_setting("per_device_train_batch_size"))
            if batch % processes:
                raise PipelineConfigError(f"dpo.per_device_train_batch_size={batch} does not split over {processes} "
                                          "processes: make it a multiple of launch.processes")
            overrides["per_device_train_batch_size"] = batch // processes
        return self.config.dpo_args(output_dir, METHODS[method].confidence, machine_defaults(self.device),
                                    **overrides)

    def dpo_bf16(self) -> bool | None:
        """`dpo.bf16` when set, else the machine's (`rbrm.dpo.machine_defaults`; on CUDA, TRL's default: None)."""
        if "bf16" in self.config.dpo:
            return bool(self.config.dpo["bf16"])
        return machine_defaults(self.device).get("bf16")

    def dpo_settings_of(self, method: str) -> dict:
        """The `dpo` settings that can change this method's training, for its stage key: plain DPO ignores the
        confidence and probe-update ones, so an RBRM ablation does not retrain the methods beside it."""
        precision = {"bf16": self.dpo_bf16()}  # resolved: the same config trains differently on another CPU
        if METHODS[method].confidence != "none":  # the optimiser named even when defaulted: its default was adam before
            return {**self.config.dpo, **precision, "reward_optimizer": self.config.dpo_setting("reward_optimizer")}
        return {**{k: v for k, v in self.config.dpo.items() if not k.startswith(("confidence_", "reward_"))},
                **precision}

    # ------------------------------------------------------------------------------------ scoring

    def score_and_pair(self, samples_path: str | list[str], out_dir: str, scorer: str = "probe") -> dict:
        """Score with the stage-1 hybrid reward on the base policy's states (or with `scorer`, see
        `external_scorer`); write ranking and pairs."""
        r = self.config.rerank
        alpha = r.alpha
        if alpha is None and self.config.dpo_setting("confidence_scale") == "alpha":
            alpha = self.config.dpo_setting("confidence_alpha")
        result = rerank_file(self.model_path, self.layout.reward_model(), samples_path, r.top_k,
                             alpha, r.min_gap, batch_tokens=r.batch_tokens, loaded=self.inference_model(r.dtype),
                             scorer=None if scorer == "probe" else self.external_scorer(scorer),
                             benign_reward_dir=self.helpfulness_reward())
        if is_main():
            write_rerank_outputs(result, out_dir, result.summary["alpha"])
        barrier()  # an online round's processes read the pairs next
        return {"forward_tokens": result.summary.get("forward_tokens") or 0, "flops": result.summary.get("flops") or 0,
                "pairs": len(result.pairs)}

    def external_scorer(self, name: str):
        """What online pipelines usually score samples with instead of the policy's own probe: a judge
        (`states`, `minilm`, `refusal`; reward = 1 - its unsafe score) or a local sequence-classification reward model
        folder (its one logit). Returns samples -> (scores, FLOPs), loaded once."""
        if name not in self.scorers:
            if name in JUDGE_NAMES:
                self.scorers[name] = judge_scorer(name)
            elif os.path.isfile(os.path.join(name, "config.json")):
                self.scorers[name] = ClassifierReward(name, self.device)
            else:
                raise PipelineConfigError(f"online.scorer {name!r}: expected probe, a judge ({', '.join(JUDGE_NAMES)})"
                                          " or a sequence-classification model folder")
        return self.scorers[name]

    # ------------------------------------------------------------------------------------ evaluation

    def eval_measures(self) -> dict:
        """What the evaluation measures beside the main judge: the helpfulness measure on benign sets (its name,
        default `states`; None when off) and the independent second judge (default the keyword judge; None when it
        would be the main judge again)."""
        e = self.config.eval
        name = e.second_judge
        return {"helpfulness": e.helpfulness_measure if e.helpfulness else None,
                "second_judge": None if not name or name == e.judge else name}

    def second_judge(self):
        """The second judge of `eval_measures`, built, or None."""
        name = self.eval_measures()["second_judge"]
        return get_judge(name, self.config.eval.second_judge_model) if name else None


def judge_scorer(name: str):
    """samples -> (rewards, FLOPs) with a judge: reward = 1 - its unsafe score."""
    judge = get_judge(name)

    def score(samples):
        prompts = [to_messages(s.prompt)[-1]["content"] for s in samples]
        responses = [s.response for s in samples]
        flops = judge.flops(prompts, responses)
        return [1.0 - r.score for r in judge.judge(prompts, responses)], flops or 0

    score.name = f"judge {name}"
    return score
