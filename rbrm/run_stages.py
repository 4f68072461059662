"""The stages of a run, one class each: its folder name, the stages it reads, the inputs its key hashes, one `run`.

A stage's key hashes `inputs()` (settings, input files, and the keys of the stages it reads); `RunContext.run`
reuses a finished stage with the same key and reruns a changed one (`rbrm.stages.run_stage`). `run(directory)`
writes the stage's outputs there and returns the compute it spent. `STAGES` maps the names that `Method.stages`
and `Method.pairs` use to their class: a new baseline adds its stage here, or in its own module.
"""

from __future__ import annotations

import dataclasses
import os

from accelerate.utils import is_peft_model

from .distributed import alone, is_main, world_size
from .dpo import dpo_compute, load_safedpo_rows, pairs_dataset, train_dpo
from .evaluation import (
    DRIFT_FILE,
    RESPONSES_FILE,
    evaluate,
    generate_sets,
    per_token_kl,
    ranking_quality,
    set_dir,
)
from .files import atomic_dir, file_digest, read_jsonl, write_json, write_jsonl
from .flops import ModelShape, generation_flops
from .formats import load_pairs
from .helpfulness import helpfulness_measure
from .judges import PACKAGED_JUDGES, get_judge, judge_key, judge_loader
from .layout import sample_files
from .methods import METHODS
from .models import load_model, load_tokenizer
from .online import round_prompts, run_round, sampling_policy, seven_b_scoring_flops, trainable_policy
from .probe_train import run_probe_train
from .render import prompt_length, render, tokenize
from .run_config import PipelineConfigError
from .run_context import RunContext
from .sampling import DecodingConfig, sample_candidates
from .stages import model_digest, read_json, stage_key, sum_compute


class Stage:
    """A cached step of a run. Subclasses set `name` and `reads` and write `inputs` and `run`."""

    name: str = ""
    reads: tuple[str, ...] = ()  # the stages whose outputs it reads (their keys are in its key)
    parallel: bool = False  # under a launcher: runs on every process (rbrm.distributed), else on the main one

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def before(self) -> list[Stage]:
        """Stages of its own to run first (the online rounds)."""
        return []

    def parts(self) -> list[str]:
        """The names of the records `before()` leaves, for reading a finished run without running it."""
        return []

    def after(self) -> list[str]:
        return [self.ctx.key_of(name) for name in self.reads]

    def inputs(self) -> dict:
        raise NotImplementedError

    def run(self, directory: str) -> dict:
        raise NotImplementedError


class ProbeStage(Stage):
    """Stage 1: a hybrid reward on the policy's states (`probe`), or the helpfulness reward that ranks the benign
    pool prompts' samples (`helpfulness_probe`: helpful answers over deflections and refusals)."""

    parallel = True  # the features split over the processes; each fits the same probe, the main one saves it

    def __init__(self, ctx: RunContext, name: str = "probe"):
        super().__init__(ctx)
        self.name = name
        self.section = dict(getattr(ctx.config, name))

    def inputs(self) -> dict:
        files = {k: file_digest(self.section[k]) for k in ("data", "test_data", "calibration_data")
                 if self.section.get(k)}
        return {**self.ctx.base_inputs(), "probe": self.section, "files": files,
                "dtype": self.ctx.resolved_dtype(self.section.get("dtype")), "seed": self.ctx.config.seed}

    def run(self, directory: str) -> dict:
        stats: dict = {}
        config = self.ctx.config.probe_train_config(self.name, directory, self.ctx.model_path, self.ctx.device)
        run_probe_train(config, stats)
        return {"forward_tokens": stats.get("forward_tokens", 0), "flops": stats.get("flops", 0)}


class HelpfulnessProbeStage(ProbeStage):
    def __init__(self, ctx: RunContext):
        super().__init__(ctx, "helpfulness_probe")


class SampleStage(Stage):
    """Stage 2a: N samples per training prompt from the base policy, plus one per refusal opening."""

    name = "sample"
    parallel = True

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.prompts = ctx.training_prompts()

    def inputs(self) -> dict:
        s = self.ctx.config.sample
        return {**self.ctx.base_inputs(), "sample": s.key(), "prompts": file_digest(s.prompts),
                **({"benign_prompts": file_digest(s.benign_prompts)} if s.benign_prompts else {}),
                **({"borderline_prompts": [file_digest(p.path) for p in self.ctx.borderline_sets()]}
                   if s.borderline_prompts else {}),
                "prompt_ids": [str(p.id) for p in self.prompts], "seed": self.ctx.config.seed,
                "dtype": self.ctx.resolved_dtype(s.dtype)}

    def run(self, directory: str) -> dict:
        s = self.ctx.config.sample
        model, tokenizer = self.ctx.inference_model(s.dtype)
        compute = sample_candidates(model, tokenizer, self.prompts, directory, s, self.ctx.config.seed)
        compute["excluded_eval_prompts"] = self.ctx.excluded_training_prompts
        return compute


class RerankStage(Stage):
    """Stage 2b: the samples scored by the hybrid reward (benign ones by the helpfulness reward), paired."""

    name = "rerank"
    parallel = True

    @property
    def reads(self) -> tuple[str, ...]:
        return ("probe", "sample") + (("helpfulness_probe",) if self.ctx.config.helpfulness_probe else ())

    def inputs(self) -> dict:
        r = self.ctx.config.rerank
        return {"rerank": dataclasses.asdict(r), "after": self.after(), "dtype": self.ctx.resolved_dtype(r.dtype)}

    def run(self, directory: str) -> dict:
        files = sample_files(self.ctx.layout.stage("sample"), len(self.ctx.config.sample.refusal_prefills or []))
        return self.ctx.score_and_pair(files, directory)


class RankingStage(Stage):
    """The re-ranked samples judged like answers (does the reward choose what the judge calls safe?), for the
    report; evaluation compute, not alignment compute."""

    name = "ranking"
    reads = ("rerank",)

    def inputs(self) -> dict:
        e = self.ctx.config.eval
        return {"after": self.after(), "judge": e.judge, "judge_model": e.judge_model}

    def run(self, directory: str) -> dict:
        layout = self.ctx.layout
        judge = get_judge(self.ctx.config.eval.judge, self.ctx.config.eval.judge_model)
        quality = ranking_quality(read_jsonl(layout.path("rerank", "rank.jsonl")),
                                  read_jsonl(layout.pairs("rerank")), judge)
        write_json(layout.ranking_quality, quality)
        return {"flops": 0}


class StaticPairsStage(Stage):
    """dpo_static's fixed pairs: those whose rendered prompt fits in `max_prompt_tokens`, then `limit`.

    Multi-turn HH prompts run to hundreds of tokens; in a short DPO window they would leave no room for the
    responses, so they are skipped rather than truncated.
    """

    name = "static_pairs"

    def inputs(self) -> dict:
        s = self.ctx.config.static_pairs
        return {**self.ctx.base_inputs(), "static_pairs": dataclasses.asdict(s), "data": file_digest(s.data)}

    def run(self, directory: str) -> dict:
        s = self.ctx.config.static_pairs
        tokenizer = load_tokenizer(self.ctx.model_path)
        cap, limit, rows = s.max_prompt_tokens, s.limit, []
        for pair in load_pairs(s.data):
            if cap is not None and len(tokenize(tokenizer, *render(tokenizer, pair.prompt, pair.chosen))[0]) > cap:
                continue
            rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
            if limit and len(rows) == limit:
                break
        if not rows:
            raise PipelineConfigError(f"static_pairs: no pair of {s.data} has a prompt of at most {cap} tokens")
        write_jsonl(os.path.join(directory, "pairs.jsonl"), rows)
        return {"pairs": len(rows), "flops": 0}  # tokenizing only


class TrainStage(Stage):
    """Stage 3: DPO (RBRM: with online confidence) from the base policy on a pair stage's `pairs.jsonl`; the merged
    policy goes to `<method>/model`."""

    parallel = True  # TRL's trainer under the launcher's process group

    def __init__(self, ctx: RunContext, method: str):
        super().__init__(ctx)
        self.name, self.method = method, METHODS[method]
        self.reads = (self.method.pairs,)

    def inputs(self) -> dict:
        ctx = self.ctx
        return {**ctx.base_inputs(), "method": self.name, "dpo": ctx.dpo_settings_of(self.name),
                "lora": ctx.config.lora, "pairs": file_digest(ctx.layout.pairs(self.method.pairs)),
                "after": self.after(), "seed": ctx.config.seed}

    def dpo_overrides(self) -> dict:
        """Settings of this method's DPO beyond the shared `dpo` section (none for plain DPO and RBRM)."""
        return {}

    def run(self, directory: str) -> dict:
        ctx = self.ctx
        tokenizer = load_tokenizer(ctx.model_path)
        reward = ctx.layout.reward_model() if self.method.confidence == "online" else None
        train_dir = os.path.join(directory, "train")
        trainer = train_dpo(ctx.training_model(), tokenizer, ctx.dpo_args(self.name, train_dir, **self.dpo_overrides()),
                            pairs_dataset(ctx.layout.pairs(self.method.pairs), tokenizer),
                            peft_config=ctx.config.lora_config(), reward_model=reward,
                            log_path=os.path.join(directory, "dpo_log.json"))
        if is_main():
            save_merged(trainer.model, tokenizer, os.path.join(directory, "model"))
        forward_tokens, flops = dpo_compute(trainer)
        return {"forward_tokens": forward_tokens, "flops": flops, "steps": trainer.state.global_step,
                "pairs": len(trainer.train_dataset)}


class OnlineRoundStage(Stage):
    parallel = True  # sampling, scoring and DPO, each split over the processes

    def __init__(self, ctx: RunContext, r: int, prompts: list, after: list[str], steps: int):
        super().__init__(ctx)
        self.name, self.r, self.prompts, self.previous_after, self.steps = f"online_rounds/round_{r}", r, prompts, \
            after, steps
        self.previous = ctx.layout.online_round(r - 1, "policy") if r else None

    def inputs(self) -> dict:
        ctx, scorer = self.ctx, self.ctx.config.online.scorer
        return {**ctx.base_inputs(), "round": self.r, "of": ctx.config.online.rounds, "sample": ctx.config.sample.key(),
                **({"scorer": scorer, "scorer_files": model_digest(scorer) if os.path.isdir(scorer) else None}
                   if scorer != "probe" else {}),
                "rerank": dataclasses.asdict(ctx.config.rerank), "dpo": ctx.dpo_settings_of("online"),
                "lora": ctx.config.lora, "prompt_ids": [str(p.id) for p in self.prompts], "after": self.previous_after,
                "seed": ctx.config.seed, "sample_dtype": ctx.resolved_dtype(ctx.config.sample.dtype),
                "rerank_dtype": ctx.resolved_dtype(ctx.config.rerank.dtype)}

    def run(self, directory: str) -> dict:
        ctx, lora, dtype = self.ctx, bool(self.ctx.config.lora), self.ctx.config.sample.dtype
        base = ctx.inference_model(dtype)[0] if self.previous is None else None
        return run_round(
            directory, self.r, tokenizer=load_tokenizer(ctx.model_path),
            sampler=sampling_policy(ctx.model_path, self.previous, lora, dtype, ctx.device, base),
            policy=trainable_policy(ctx.model_path, self.previous, lora, ctx.device),
            reference=ctx.reference_model(), prompts=self.prompts, section=ctx.config.sample,
            seed=ctx.config.seed + 1000 * (self.r + 1),
            score_pairs=lambda files, out: ctx.score_and_pair(files, out, ctx.config.online.scorer),
            args=ctx.dpo_args("online", os.path.join(directory, "train"), max_steps=self.steps),
            peft_config=ctx.config.lora_config() if self.previous is None else None)


class OnlineStage(Stage):
    """(e): R rounds of sampling from the current policy, scoring and pairing with the frozen hybrid reward, DPO
    (`rbrm.online`); each round is a stage in `online_rounds/`, and this one holds the merged final policy and
    the summed compute."""

    name = "online"

    def __init__(self, ctx: RunContext, method: str = "online"):
        super().__init__(ctx)
        self.rounds_done: list[str] = []

    def before(self):
        """The rounds, one after another: each one's key holds the previous one's."""
        ctx, rounds = self.ctx, self.ctx.config.online.rounds
        steps = int(ctx.config.dpo["max_steps"]) // rounds
        per_step = (int(ctx.config.dpo_setting("per_device_train_batch_size"))
                    * int(ctx.config.dpo_setting("gradient_accumulation_steps")))
        prompts = ctx.training_prompts()
        if not prompts:
            raise PipelineConfigError("online: no training prompts left after removing the evaluation prompts")
        after = [ctx.key_of("probe"), stage_key({"prompt_ids": [str(p.id) for p in prompts]})]
        for r in range(rounds):
            chosen = round_prompts(prompts, r, steps * per_step, ctx.config.online.samples == "all")
            stage = OnlineRoundStage(ctx, r, chosen, after, steps)
            yield stage
            self.rounds_done.append(stage.name)
            after = [ctx.key_of(stage.name)]

    def parts(self) -> list[str]:
        return [f"online_rounds/round_{r}" for r in range(self.ctx.config.online.rounds)]

    def inputs(self) -> dict:
        return {"after": [self.ctx.key_of(self.rounds_done[-1])]}

    def run(self, directory: str) -> dict:
        ctx, rounds = self.ctx, self.ctx.config.online.rounds
        policy_dir = ctx.layout.online_round(rounds - 1, "policy")
        lora = bool(ctx.config.lora)
        save_merged(trainable_policy(ctx.model_path, policy_dir, lora, ctx.device),
                    load_tokenizer(ctx.model_path), os.path.join(directory, "model"))
        logs = [row for k in range(rounds) for row in read_json(ctx.layout.online_round(k, "dpo_log.json")) or []]
        write_json(os.path.join(directory, "dpo_log.json"), logs)
        records = [ctx.records[name] for name in self.rounds_done]
        total = sum_compute(records)
        return {k: total[k] for k in ("generated_tokens", "forward_tokens", "flops")} | {
            "construction_flops": sum(r["compute"].get("construction_flops", 0) for r in records),
            "round_wall_seconds": total["wall_seconds"], "rounds": rounds,
            "seven_b_scoring_flops": seven_b_scoring_flops(
                ctx.model_path, [ctx.layout.online_round(k) for k in range(rounds)])}


class EvalStage(Stage):
    """Stage 4: greedy answers to the evaluation sets, judged (main and second judge, helpfulness on benign
    sets), the per-token KL from the base policy on benign answers, and the evaluation's own compute."""

    parallel = True  # the answers; judging and the figures on the main process

    def __init__(self, ctx: RunContext, method: str):
        super().__init__(ctx)
        self.method = method
        self.name = f"{method}/eval"
        self.reads = (method,) if METHODS[method].trains else ()

    def inputs(self) -> dict:
        ctx, e = self.ctx, self.ctx.config.eval
        return {**ctx.base_inputs(), "eval": dataclasses.asdict(e), "after": self.after(),
                "sets": {s.name: file_digest(s.path) for s in ctx.eval_sets()},
                "measures": ctx.eval_measures(), "dtype": ctx.resolved_dtype(e.dtype)}

    def run(self, directory: str) -> dict:
        ctx, e, sets = self.ctx, self.ctx.config.eval, self.ctx.eval_sets()
        base = not METHODS[self.method].trains
        model_dir = ctx.model_path if base else ctx.layout.model(self.method)
        model, tokenizer = (ctx.inference_model(e.dtype) if base else
                            load_model(model_dir, dtype=e.dtype, device=ctx.device))
        if world_size() > 1:  # every process answers its share of the prompts; the main one then judges them all
            generate_sets(model, tokenizer, sets, directory, DecodingConfig.greedy(e.max_new_tokens), e.batch_prompts,
                          ctx.config.seed)
            if not is_main():
                return {}
        with alone():
            return self.judged(model, tokenizer, model_dir, directory)

    def judged(self, model, tokenizer, model_dir: str, directory: str) -> dict:
        """The answers (generated here unless all processes made them), judged; the drift; the compute."""
        ctx, e, sets = self.ctx, self.ctx.config.eval, self.ctx.eval_sets()
        loader = judge_loader(e.judge, e.judge_model)
        summaries = evaluate(model, tokenizer, sets, loader, directory, DecodingConfig.greedy(e.max_new_tokens),
                             model_info={"name": self.method, "path": model_dir}, batch_prompts=e.batch_prompts,
                             seed=ctx.config.seed, resamples=e.resamples, plot=False,
                             helpfulness=ctx.eval_measures()["helpfulness"], second_judge=ctx.second_judge())
        if METHODS[self.method].trains:
            write_json(os.path.join(directory, DRIFT_FILE), self.drift(model, sets, directory))
        return {"generated_tokens": sum(s["compute"]["generated_tokens"] for s in summaries.values()),
                **self.flops(model, tokenizer, sets, directory,
                             loader() if judge_key(e.judge) in PACKAGED_JUDGES else None)}

    def drift(self, model, sets: list, directory: str) -> dict:
        """The per-token KL from the base policy on the method's own answers to the benign sets (None without one)."""
        base, tokenizer = self.ctx.inference_model(self.ctx.config.eval.dtype)
        rows = [(r["prompt"], r["response"]) for pset in sets if pset.benign
                for r in read_jsonl(os.path.join(set_dir(directory, pset, len(sets) > 1), RESPONSES_FILE))]
        return {"benign_kl": per_token_kl(model, base, tokenizer, rows) if rows else None}

    def flops(self, model, tokenizer, sets: list, directory: str, judge) -> dict:
        """The evaluation's own compute, apart from alignment: generating the answers, and judging them (the
        main and the second judge, the helpfulness measure on benign sets). Judging is None where a judge does
        not count its FLOPs (a guard model, passed here as None so that it is not loaded again)."""
        measures = self.ctx.eval_measures()
        shape, generation, judging = ModelShape.of(model), 0, 0
        helpfulness = (helpfulness_measure(measures["helpfulness"]) if measures["helpfulness"]
                       and any(s.benign for s in sets) else None)
        cheap = judge_key(measures["second_judge"]) in PACKAGED_JUDGES
        second = self.ctx.second_judge() if cheap else None  # a guard model is not loaded again: not counted
        if measures["second_judge"] and not cheap:
            judge = None
        for pset in sets:
            rows = read_jsonl(os.path.join(set_dir(directory, pset, len(sets) > 1), RESPONSES_FILE))
            generation += sum(generation_flops(shape, prompt_length(tokenizer, r["prompt"]),
                                               int(r.get("num_tokens") or 0)) for r in rows)
            texts = ([r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in rows],
                     [r["response"] for r in rows])
            for counter in [judge] + ([second] if second else []) + ([helpfulness] if pset.benign and helpfulness
                                                                     else []):
                flops = counter.flops(*texts) if counter is not None else None
                judging = None if flops is None or judging is None else judging + flops
        return {"eval_generation_flops": generation, "judge_flops": judging}


class SafetyPairsStage(Stage):
    """SafeDPO's pairs: the `safedpo.data` pairs after its transformation (the safe answer chosen, both-unsafe
    pairs dropped), the first `limit`, each with its `safety_margin` (`rbrm.dpo.safedpo`)."""

    name = "safety_pairs"

    def inputs(self) -> dict:
        s = self.ctx.config.safedpo
        return {**self.ctx.base_inputs(), "safety_pairs": {"data": s.data, "limit": s.limit},
                "data": file_digest(s.data)}

    def run(self, directory: str) -> dict:
        s = self.ctx.config.safedpo
        rows = load_safedpo_rows(s.data, s.limit)
        write_jsonl(os.path.join(directory, "pairs.jsonl"), rows)
        return {"pairs": len(rows), "flops": 0}  # labels given: no sampling, no scoring


class SafeDPOTrainStage(TrainStage):
    """SafeDPO's training: plain DPO on its pairs plus the safety margin Delta (`safedpo.margin`) in the loss."""

    def inputs(self) -> dict:
        return {**super().inputs(), "safety_margin": self.ctx.config.safedpo.margin}

    def dpo_overrides(self) -> dict:
        return {"safety_margin": self.ctx.config.safedpo.margin}


# The stages a `Method` may name in `stages` or `pairs`, by name.
STAGES: dict[str, type[Stage]] = {
    "probe": ProbeStage, "helpfulness_probe": HelpfulnessProbeStage, "sample": SampleStage, "rerank": RerankStage,
    "static_pairs": StaticPairsStage, "safety_pairs": SafetyPairsStage, "online": OnlineStage,
}

# A method's own training stage, where it is not one DPO run on its pairs (`TrainStage`).
TRAINING: dict[str, type[Stage]] = {"online": OnlineStage, "safedpo": SafeDPOTrainStage}


def save_merged(model, tokenizer, out_dir: str) -> None:
    """The policy with any LoRA adapter merged in, as a plain Hugging Face folder (`--model` loads it)."""
    if is_peft_model(model):
        model = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
