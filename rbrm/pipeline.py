"""`rbrm pipeline --config CONFIG`: stages 1-4 for every method, cached and resumable, then the report.

The methods, and what each trains on, are in `methods.py`.

Folders under `<out_dir>/<name>/`: `probe/`, `sample/`, `rerank/`, `static_pairs/`, one per method (`train/`, `model/`,
`eval/`), `online_rounds/round_K/`, then `report.md`, `report.json` and `figures/`. Each stage is cached and resumable
(`stages.py`): a finished stage with the same key is reused, a changed one is moved aside to `<stage>.old/`
and rerun, and so is everything after it. An unfinished stage resumes where the stage
itself can (sampling and evaluation keep their rows, DPO restarts from its last checkpoint) and restarts
otherwise. Compute is counted per stage (generated tokens, forward-pass tokens, wall seconds summed over every
run of the stage that ended) and summed per method over the stages that method needs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

from accelerate.utils import is_peft_model
from peft import PeftModel
from transformers.trainer_utils import get_last_checkpoint

from . import __version__
from .dpo import ConfidenceDPOConfig, ConfidenceDPOTrainer, machine_defaults, pairs_dataset
from .evaluation import (
    DRIFT_FILE,
    RESPONSES_FILE,
    evaluate,
    load_set,
    over_refusal_set,
    parse_prompt_set,
    per_token_kl,
    set_dir,
)
from .files import atomic_dir, file_digest, read_jsonl, write_json, write_jsonl
from .flops import ModelShape, generation_flops
from .formats import load_pairs, load_prompts
from .helpfulness import HelpfulnessJudge
from .judges import JUDGE_NAMES, get_judge, judge_loader
from .methods import METHODS
from .models import (
    default_device,
    load_causal_lm,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from .probe_train import run_probe_train
from .render import matching_key, prompt_length, render, to_messages, tokenize
from .report import write_report, write_seeds_report
from .rerank import BENIGN_PREFIX, ClassifierReward, rerank_file, write_rerank_outputs
from .run_config import PipelineConfig, PipelineConfigError
from .sampling import DecodingConfig, generate_responses
from .stages import model_digest, read_json, run_stage, stage_key, sum_compute

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- the stages


class Pipeline:
    """Holds the config, the loaded base model (inference) and the finished stage records."""

    def __init__(self, config: PipelineConfig, config_path: str | None = None,
                 shared: dict[str, str] | None = None):
        """`shared`: stages read from (and written to) another run's folder, e.g. {"probe": <run>/probe} for the
        online curve's runs, which train from the main run's hybrid reward."""
        self.config = config
        self.shared = dict(shared or {})
        self.curve: list[tuple[int, Pipeline]] = []  # (rounds, the finished online run), when online_rounds
        self.config_path = config_path
        self.device = config.device or default_device()
        self.model_path = resolve_model(config.model)
        self.records: dict[str, dict] = {}
        self._inference: dict = {}
        self._scorers: dict = {}  # online.scorer, loaded once
        self.eval_prompt_keys: set[str] | None = None
        self.excluded_training_prompts: int | None = None

    def path(self, *parts: str) -> str:
        if parts and parts[0] in self.shared:
            return os.path.join(self.shared[parts[0]], *parts[1:])
        return os.path.join(self.config.run_dir, *parts)

    def curve_runs(self) -> list[tuple[int, Pipeline]]:
        """One online-only pipeline per `online_rounds` entry, in <run>/curve/online_r<R>/, sharing this run's
        probe and evaluation sets."""
        runs = []
        for rounds in self.config.online_rounds or []:
            config = dataclasses.replace(self.config, methods=["online"],
                                         online=dataclasses.replace(self.config.online, rounds=rounds),
                                         online_rounds=None, seeds=None, name=f"online_r{rounds}",
                                         out_dir=os.path.join(self.config.run_dir, "curve"))
            runs.append((rounds, Pipeline(config, self.config_path, {"probe": self.path("probe")})))
        return runs

    def inference_model(self, dtype: str = "auto"):
        """(model, tokenizer) of the base policy for sampling, scoring and evaluation, loaded once."""
        if dtype not in self._inference:
            self._inference[dtype] = load_model(self.model_path, dtype=dtype, device=self.device)
        return self._inference[dtype]

    def resolved_dtype(self, dtype: str | None) -> str:
        """The precision a stage's `dtype` runs in here, for its stage key: `auto` is fp32 on one CPU, bf16 on
        another (measured), and the figures differ."""
        return str(resolve_dtype(dtype, self.device, inference=True))

    def _base_inputs(self) -> dict:
        """In every key: the model's files and rbrm's version (the code itself is not hashed)."""
        return {"model": self.model_path, "model_files": model_digest(self.model_path), "rbrm": __version__}

    # ----------------------------------------------------------------------------------- stage 1

    def probe(self) -> dict:
        return self._probe_stage("probe", self.config.probe)

    def helpfulness_probe(self) -> dict:
        """A second hybrid reward, trained on helpful answers over deflections and refusals: it ranks the benign
        pool prompts' samples, so their chosen answer is the most helpful one, not the safest-looking one."""
        return self._probe_stage("helpfulness_probe", self.config.helpfulness_probe)

    def _probe_stage(self, name: str, options: dict) -> dict:
        section = dict(options)
        files = {k: file_digest(section[k]) for k in ("data", "test_data", "calibration_data") if section.get(k)}

        def body(directory: str) -> dict:
            stats: dict = {}
            run_probe_train(self.config.probe_train_config(name, directory, self.model_path, self.device), stats)
            return {"forward_tokens": stats.get("forward_tokens", 0), "flops": stats.get("flops", 0)}

        return self._stage(name, {**self._base_inputs(), "probe": section, "files": files,
                                  "dtype": self.resolved_dtype(section.get("dtype")), "seed": self.config.seed},
                           body)

    def helpfulness_reward(self) -> str | None:
        """The helpfulness reward's folder when the run has one (it ranks the benign pool prompts)."""
        return self.path("helpfulness_probe", "reward_model") if self.config.helpfulness_probe else None

    def stages_of(self, method: str) -> tuple[str, ...]:
        """The shared stages a method needs: its `Method.stages`, and the helpfulness reward where it ranks pairs."""
        stages = METHODS[method].stages
        if self.config.helpfulness_probe and "rerank" in stages:
            stages = (*stages[:stages.index("rerank")], "helpfulness_probe", *stages[stages.index("rerank"):])
        return stages

    # ----------------------------------------------------------------------------------- stage 2

    def training_prompts(self) -> list:
        """The harmful sampling prompts, then the optional benign ones (the paper's "general" samples, ids
        prefixed `benign:`), each minus any evaluation prompt (case/space-insensitive), then `skip`/`limit`."""
        s = self.config.sample
        evaluation, out, self.excluded_training_prompts = self.evaluation_keys(), [], 0
        for prefix in ("", "benign_"):
            if not getattr(s, prefix + "prompts"):
                continue
            prompts = load_prompts(getattr(s, prefix + "prompts"), prompt_field=getattr(s, prefix + "prompt_field"),
                                   where=getattr(s, prefix + "where"))
            kept = [p for p in prompts if matching_key(p.prompt) not in evaluation]
            self.excluded_training_prompts += len(prompts) - len(kept)
            skip, limit = getattr(s, prefix + "skip"), getattr(s, prefix + "limit")
            kept = kept[skip:skip + limit] if limit else kept[skip:]
            out += [dataclasses.replace(p, id=f"{BENIGN_PREFIX}{p.id}") for p in kept] if prefix else kept
        return out

    def evaluation_keys(self) -> set[str]:
        if self.eval_prompt_keys is None:
            held_out = self.eval_sets() + [parse_prompt_set(spec) for spec in self.config.sample.exclude or []]
            self.eval_prompt_keys = {matching_key(p.prompt) for pset in held_out for p in load_set(pset)}
        return self.eval_prompt_keys

    def _sample_into(self, model, tokenizer, prompts: list, out_path: str, seed: int, n: int | None = None,
                     prefill: str = "", first_index: int = 0) -> dict:
        """Sample `n` responses per prompt into `out_path` (resumable); exact token counts over the file."""
        s = self.config.sample
        n = s.n if n is None else n
        rows = generate_responses(model, tokenizer, prompts, n, s.generation_settings(), out_path,
                                  s.batch_prompts, seed, max_sequences=s.max_sequences, prefill=prefill,
                                  first_index=first_index)
        sampled = {r["prompt_id"] for r in rows}  # prompts too long for the context were skipped, not prefilled
        forced = len(tokenizer(prefill, add_special_tokens=False)["input_ids"]) if prefill else 0
        length = {str(p.id): prompt_length(tokenizer, p.prompt) + forced for p in prompts if str(p.id) in sampled}
        shape = ModelShape.of(model)
        return {"generated_tokens": sum(int(r["num_tokens"]) for r in rows), "forward_tokens": sum(length.values()) * n,
                "flops": sum(generation_flops(shape, length[str(r["prompt_id"])], int(r["num_tokens"])) for r in rows),
                "responses": len(rows)}

    def _sample_candidates(self, model, tokenizer, prompts: list, directory: str, seed: int) -> dict:
        """`n` samples per prompt, then one answer per refusal opening to every prompt: the candidates that
        re-ranking orders (`sample_files`). On a harmful prompt the safety reward may choose the refusal; on a
        benign one the helpfulness reward ranks it low, so the pair teaches not to refuse there."""
        s = self.config.sample
        files = self.sample_files(directory)
        compute = self._sample_into(model, tokenizer, prompts, files[0], seed)
        for j, (text, path) in enumerate(zip(s.refusal_prefills or [], files[1:])):
            more = self._sample_into(model, tokenizer, prompts, path, seed + 1 + j, n=1, prefill=text,
                                     first_index=s.n + j)
            compute = {k: v + more[k] for k, v in compute.items()}
        return compute

    def sample_files(self, directory: str) -> list[str]:
        """The sample stage's files: the policy's own samples, then one file per refusal opening."""
        prefills = self.config.sample.refusal_prefills or []
        return [os.path.join(directory, "samples.jsonl")] + [
            os.path.join(directory, f"prefilled_{j}.jsonl") for j in range(len(prefills))]

    def sample(self) -> dict:
        s = self.config.sample
        prompts = self.training_prompts()
        inputs = {**self._base_inputs(), "sample": s.key(), "prompts": file_digest(s.prompts),
                  **({"benign_prompts": file_digest(s.benign_prompts)} if s.benign_prompts else {}),
                  "prompt_ids": [str(p.id) for p in prompts], "seed": self.config.seed,
                  "dtype": self.resolved_dtype(s.dtype)}

        def body(directory: str) -> dict:
            model, tokenizer = self.inference_model(s.dtype)
            compute = self._sample_candidates(model, tokenizer, prompts, directory, self.config.seed)
            compute["excluded_eval_prompts"] = self.excluded_training_prompts
            return compute

        return self._stage("sample", inputs, body)

    def _score_and_pair(self, samples_path: str | list[str], out_dir: str, scorer: str = "probe") -> dict:
        """Score with the stage-1 hybrid reward on the base policy's states (or with `scorer`, see
        `external_scorer`); write ranking and pairs."""
        r = self.config.rerank
        alpha = r.alpha
        if alpha is None and self.config.dpo_setting("confidence_scale") == "alpha":
            alpha = self.config.dpo_setting("confidence_alpha")
        result = rerank_file(self.model_path, self.path("probe", "reward_model"), samples_path, r.top_k,
                             alpha, r.min_gap, batch_tokens=r.batch_tokens, loaded=self.inference_model(r.dtype),
                             scorer=None if scorer == "probe" else self.external_scorer(scorer),
                             benign_reward_dir=self.helpfulness_reward())
        write_rerank_outputs(result, out_dir, result.summary["alpha"])
        return {"forward_tokens": result.summary.get("forward_tokens") or 0, "flops": result.summary.get("flops") or 0,
                "pairs": len(result.pairs)}

    def external_scorer(self, name: str):
        """What online pipelines usually score samples with instead of the policy's own probe: a judge
        (`minilm`, `refusal`; reward = 1 - its unsafe score) or a local sequence-classification reward model
        folder (its one logit). Returns samples -> (scores, FLOPs), loaded once."""
        if name not in self._scorers:
            if name in JUDGE_NAMES:
                judge = get_judge(name)

                def score(samples):
                    prompts = [to_messages(s.prompt)[-1]["content"] for s in samples]
                    responses = [s.response for s in samples]
                    flops = judge.flops(prompts, responses)
                    return [1.0 - r.score for r in judge.judge(prompts, responses)], flops or 0
                score.name = f"judge {name}"
                self._scorers[name] = score
            elif os.path.isfile(os.path.join(name, "config.json")):
                self._scorers[name] = ClassifierReward(name, self.device)
            else:
                raise PipelineConfigError(f"online.scorer {name!r}: expected probe, a judge ({', '.join(JUDGE_NAMES)})"
                                          " or a sequence-classification model folder")
        return self._scorers[name]

    def rerank(self) -> dict:
        after = [self.records[name]["key"] for name in ("probe", "sample")
                 + (("helpfulness_probe",) if self.config.helpfulness_probe else ())]
        inputs = {"rerank": dataclasses.asdict(self.config.rerank), "after": after,
                  "dtype": self.resolved_dtype(self.config.rerank.dtype)}
        return self._stage("rerank", inputs, lambda d: self._score_and_pair(self.sample_files(self.path("sample")), d))

    def static_pairs(self) -> dict:
        """dpo_static's fixed pairs: those whose rendered prompt fits in `max_prompt_tokens`, then `limit`.

        Multi-turn HH prompts run to hundreds of tokens; in a short DPO window they would leave no room for the
        responses, so they are skipped rather than truncated.
        """
        s = self.config.static_pairs

        def body(directory: str) -> dict:
            tokenizer = load_tokenizer(self.model_path)
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

        return self._stage("static_pairs", {**self._base_inputs(), "static_pairs": dataclasses.asdict(s),
                                            "data": file_digest(s.data)}, body)

    # ----------------------------------------------------------------------------------- stage 3

    def dpo_args(self, method: str, output_dir: str, **overrides) -> ConfidenceDPOConfig:
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

    def train_model(self, method: str, pairs_path: str, after: list[str]) -> dict:
        """DPO (or RBRM) from the base policy on `pairs_path`; the merged policy goes to `<method>/model`."""
        inputs = {**self._base_inputs(), "method": method, "dpo": self.dpo_settings_of(method),
                  "lora": self.config.lora, "pairs": file_digest(pairs_path), "after": after, "seed": self.config.seed}

        def body(directory: str) -> dict:
            train_dir = os.path.join(directory, "train")
            tokenizer = load_tokenizer(self.model_path)
            model = self.training_model()
            reward = self.path("probe", "reward_model") if METHODS[method].confidence == "online" else None
            trainer = ConfidenceDPOTrainer(model, args=self.dpo_args(method, train_dir),
                                           train_dataset=pairs_dataset(pairs_path, tokenizer),
                                           processing_class=tokenizer, peft_config=self.config.lora_config(),
                                           reward_model=reward)
            trainer.train(resume_from_checkpoint=_last_checkpoint(train_dir))
            trainer.save_model(train_dir)
            write_json(os.path.join(directory, "dpo_log.json"), trainer.state.log_history)
            _save_merged(trainer.model, tokenizer, os.path.join(directory, "model"))
            return {"forward_tokens": trainer.forward_tokens, "flops": trainer.flops, "steps": trainer.state.global_step,
                    "pairs": len(trainer.train_dataset)}

        return self._stage(method, inputs, body)

    def training_model(self, adapter: str | None = None):
        """A fresh trainable copy of the base policy (fp32 on CPU), optionally with a saved LoRA adapter."""
        dtype = resolve_dtype("auto", self.device, inference=False)
        model = load_causal_lm(self.model_path, dtype=dtype)
        if adapter is None:
            return model
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)

    def online(self) -> dict:
        """R rounds of: sample from the current policy (the prompts this round's updates need, or every training
        prompt: `online.samples`), score and pair with the frozen hybrid reward, DPO."""
        rounds = self.config.online.rounds
        steps = int(self.config.dpo["max_steps"]) // rounds
        per_step = (int(self.config.dpo_setting("per_device_train_batch_size"))
                    * int(self.config.dpo_setting("gradient_accumulation_steps")))
        prompts = self.training_prompts()
        need = steps * per_step
        if not prompts:
            raise PipelineConfigError("online: no training prompts left after removing the evaluation prompts")
        after = [self.records["probe"]["key"], stage_key({"prompt_ids": [str(p.id) for p in prompts]})]
        policy_dir, records = None, []
        for r in range(rounds):
            # each round's prompts: the whole pool (`online.samples: all`), or those its updates need, cycling
            # through the pool, distinct within a round (DPO takes epochs over fewer)
            chosen = (prompts if self.config.online.samples == "all" else
                      [prompts[(r * need + i) % len(prompts)] for i in range(min(need, len(prompts)))])
            scorer = self.config.online.scorer
            inputs = {**self._base_inputs(), "round": r, "of": rounds, "sample": self.config.sample.key(),
                      **({"scorer": scorer, "scorer_files": model_digest(scorer) if os.path.isdir(scorer) else None}
                         if scorer != "probe" else {}),
                      "rerank": dataclasses.asdict(self.config.rerank), "dpo": self.dpo_settings_of("online"), "lora": self.config.lora,
                      "prompt_ids": [str(p.id) for p in chosen], "after": after, "seed": self.config.seed,
                      "sample_dtype": self.resolved_dtype(self.config.sample.dtype),
                      "rerank_dtype": self.resolved_dtype(self.config.rerank.dtype)}
            records.append(self._stage(f"online_rounds/round_{r}", inputs, lambda d, r=r, chosen=chosen, prev=policy_dir:
                                       self._online_round(d, r, chosen, prev, steps)))
            policy_dir = self.path("online_rounds", f"round_{r}", "policy")
            after = [records[-1]["key"]]

        def finish(directory: str) -> dict:
            _save_merged(self.training_model(policy_dir) if self.config.lora else _load_full(policy_dir),
                         load_tokenizer(self.model_path), os.path.join(directory, "model"))
            logs = [row for k in range(rounds) for row in read_json(
                self.path("online_rounds", f"round_{k}", "dpo_log.json")) or []]
            write_json(os.path.join(directory, "dpo_log.json"), logs)
            total = sum_compute(records)
            return {k: total[k] for k in ("generated_tokens", "forward_tokens", "flops")} | {
                "construction_flops": sum(r["compute"].get("construction_flops", 0) for r in records),
                "round_wall_seconds": total["wall_seconds"], "rounds": rounds}

        # The rounds live in online_rounds/; the merged final policy and the summed compute in online/.
        return self._stage("online", {"after": after}, finish)

    def sampling_policy(self, previous: str | None):
        """The current online policy in the precision the sample stage uses (bf16 where it is the CPU's faster one): the
        base policy in round 0, then the base with the previous round's LoRA adapter merged in (or the previous
        round's full weights). With the fp32 training copy round 0 of `make compare` took 425 s, with this 350."""
        dtype = self.config.sample.dtype
        if previous is None:
            return self.inference_model(dtype)[0]
        if not self.config.lora:
            return load_model(previous, dtype=dtype, device=self.device)[0]
        base = load_causal_lm(self.model_path, dtype=resolve_dtype(dtype, self.device, inference=True))
        return PeftModel.from_pretrained(base, previous).merge_and_unload().to(self.device).eval()

    def _online_round(self, directory: str, r: int, prompts: list, previous: str | None, steps: int) -> dict:
        tokenizer = load_tokenizer(self.model_path)
        compute = self._sample_candidates(self.sampling_policy(previous), tokenizer, prompts, directory,
                                          self.config.seed + 1000 * (r + 1))
        if previous is None:
            policy = self.training_model()
        elif self.config.lora:
            policy = self.training_model(previous)
        else:
            policy = _load_full(previous)
        scorer = self.config.online.scorer
        scored = self._score_and_pair(self.sample_files(directory), os.path.join(directory, "pairs"), scorer)
        if not scored["pairs"]:
            raise PipelineConfigError(f"online round {r}: no pairs, every prompt's samples tie under online.scorer "
                                      f"{scorer!r}; choose a scorer that grades answers")
        reference = self.reference_model()
        train_dir = os.path.join(directory, "train")
        trainer = ConfidenceDPOTrainer(policy, ref_model=reference,
                                       args=self.dpo_args("online", train_dir, max_steps=steps),
                                       train_dataset=pairs_dataset(os.path.join(directory, "pairs", "pairs.jsonl"),
                                                                   tokenizer),
                                       processing_class=tokenizer,
                                       peft_config=self.config.lora_config() if previous is None else None)
        trainer.train(resume_from_checkpoint=_last_checkpoint(train_dir))
        trainer.save_model(os.path.join(directory, "policy"))
        write_json(os.path.join(directory, "dpo_log.json"), trainer.state.log_history)
        return {"generated_tokens": compute["generated_tokens"],
                "forward_tokens": compute["forward_tokens"] + scored["forward_tokens"] + trainer.forward_tokens,
                "flops": compute["flops"] + scored["flops"] + trainer.flops,
                "construction_flops": compute["flops"] + scored["flops"],  # sampling and scoring, without DPO
                "pairs": scored["pairs"], "steps": trainer.state.global_step}

    def reference_model(self):
        """The frozen initial policy, the reference of every online round (not the previous round's policy)."""
        if "reference" not in self._inference:
            model = self.training_model().eval().requires_grad_(False)
            self._inference["reference"] = model
        return self._inference["reference"]

    # ----------------------------------------------------------------------------------- stage 4

    def eval_sets(self) -> list:
        e = self.config.eval
        sets = [parse_prompt_set(spec) for spec in e.prompts]
        if e.over_refusal:
            sets.append(over_refusal_set(e.over_refusal_limit))
        return sets

    def evaluate(self, method: str) -> dict:
        e = self.config.eval
        sets = self.eval_sets()
        model_dir = self.model_path if method == "base" else self.path(method, "model")
        after = [self.records[method]["key"]] if method != "base" else []
        inputs = {**self._base_inputs(), "eval": dataclasses.asdict(e), "after": after,
                  "sets": {s.name: file_digest(s.path) for s in sets},
                  "measures": self.eval_measures(), "dtype": self.resolved_dtype(e.dtype)}

        def body(directory: str) -> dict:
            model, tokenizer = (self.inference_model(e.dtype) if method == "base" else
                                load_model(model_dir, dtype=e.dtype, device=self.device))
            settings = DecodingConfig.greedy(e.max_new_tokens)
            loader = judge_loader(e.judge, e.judge_model)
            summaries = evaluate(model, tokenizer, sets, loader,
                                 directory, settings, model_info={"name": method, "path": model_dir},
                                 batch_prompts=e.batch_prompts, seed=self.config.seed,
                                 resamples=e.resamples, plot=False,
                                 helpfulness=self.eval_measures()["helpfulness"],
                                 second_judge=self.second_judge())
            if method != "base":
                write_json(os.path.join(directory, DRIFT_FILE), self._drift(model, sets, directory))
            return {"generated_tokens": sum(s["compute"]["generated_tokens"] for s in summaries.values()),
                    **self._eval_flops(model, tokenizer, sets, directory,
                                       loader() if e.judge in ("minilm", "refusal") else None)}

        return self._stage(f"{method}/eval", inputs, body)

    def _drift(self, model, sets: list, directory: str) -> dict:
        """The per-token KL from the base policy on the method's own answers to the benign sets (None without one)."""
        base, tokenizer = self.inference_model(self.config.eval.dtype)
        rows = [(r["prompt"], r["response"]) for pset in sets if pset.benign
                for r in read_jsonl(os.path.join(set_dir(directory, pset, len(sets) > 1), RESPONSES_FILE))]
        return {"benign_kl": per_token_kl(model, base, tokenizer, rows) if rows else None}

    def _eval_flops(self, model, tokenizer, sets: list, directory: str, judge) -> dict:
        """The evaluation's own compute, apart from alignment: generating the answers, and judging them (the
        main and the second judge, the helpfulness measure on benign sets). Judging is None where a judge does
        not count its FLOPs (a guard model, passed here as None so that it is not loaded again)."""
        shape, generation, judging = ModelShape.of(model), 0, 0
        helpfulness = HelpfulnessJudge() if self.eval_measures()["helpfulness"] and any(s.benign for s in sets) \
            else None
        cheap = self.eval_measures()["second_judge"] in ("minilm", "refusal")
        second = self.second_judge() if cheap else None  # a guard model is not loaded again: not counted
        if self.eval_measures()["second_judge"] and not cheap:
            judge = None
        for pset in sets:
            rows = read_jsonl(os.path.join(set_dir(directory, pset, len(sets) > 1), "responses.jsonl"))
            generation += sum(generation_flops(shape, prompt_length(tokenizer, r["prompt"]), int(r.get("num_tokens") or 0))
                              for r in rows)
            texts = ([r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in rows],
                     [r["response"] for r in rows])
            for counter in [judge] + ([second] if second else []) + ([helpfulness] if pset.benign and helpfulness
                                                                     else []):
                flops = counter.flops(*texts) if counter is not None else None
                judging = None if flops is None or judging is None else judging + flops
        return {"eval_generation_flops": generation, "judge_flops": judging}

    def eval_measures(self) -> dict:
        """What the evaluation measures beside the main judge: helpfulness on benign sets (default on) and the
        independent second judge (default the keyword judge; None when it would be the main judge again)."""
        e = self.config.eval
        name = e.second_judge
        return {"helpfulness": e.helpfulness, "second_judge": None if not name or name == e.judge else name}

    def second_judge(self):
        """The second judge of `eval_measures`, built, or None."""
        name = self.eval_measures()["second_judge"]
        return get_judge(name, self.config.eval.second_judge_model) if name else None

    # -------------------------------------------------------------------------------------- driver

    def _stage(self, name: str, inputs: dict, body: Callable[[str], dict | None]) -> dict:
        record = run_stage(self.path(*name.split("/")), inputs, body, name)
        self.records[name] = record
        return record

    def load_records(self, methods: list[str] | None = None) -> None:
        """The finished stages' records of these methods (default: the config's), running nothing."""
        methods = methods or self.config.methods
        needed = {s for m in methods for s in self.stages_of(m)}
        needed |= {m for m in methods if METHODS[m].trains} | {f"{m}/eval" for m in methods}
        for name in sorted(needed):
            record = read_json(os.path.join(self.path(*name.split("/")), "stage.json"))
            if record is None:
                raise PipelineConfigError(f"stage {name} has not finished in {self.path()}")
            self.records[name] = record
        if "sample" in needed:
            self.training_prompts()  # counts the evaluation prompts dropped from training

    def report_only(self) -> dict:
        """Redraw report.md/json and the figures from finished stages, running nothing."""
        self.load_records()
        self.curve = self.curve_runs()
        for _, run in self.curve:
            run.load_records()
        return write_report(self)

    def run(self) -> dict:
        methods = self.config.methods
        trains = [m for m in methods if METHODS[m].trains]
        needed = {s for m in trains for s in self.stages_of(m)}
        if "probe" in needed:
            self.probe()
        if "helpfulness_probe" in needed:
            self.helpfulness_probe()
        if "rerank" in needed:
            self.sample()
            self.rerank()
        for method in trains:
            source = METHODS[method].pairs
            if source == "online":
                self.online()
                continue
            if source == "static_pairs":
                self.static_pairs()
            self.train_model(method, self.path(source, "pairs.jsonl"), [self.records[source]["key"]])
        for method in methods:
            self.evaluate(method)
        if self.config.online_rounds:
            self.probe()
            self.curve = self.curve_runs()
            for rounds, run in self.curve:
                print(f"== online curve: {rounds} round(s) ({run.path()})", flush=True)
                run._inference = self._inference  # the same base model, loaded once
                run.run()
        return write_report(self)


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
    return write_seeds_report(config, pipelines)


# ------------------------------------------------------------------------------------------- helpers


def _last_checkpoint(directory: str) -> str | None:
    return get_last_checkpoint(directory) if os.path.isdir(directory) else None


def _load_full(path: str):
    return load_causal_lm(path)


def _save_merged(model, tokenizer, out_dir: str) -> None:
    """The policy with any LoRA adapter merged in, as a plain Hugging Face folder (`--model` loads it)."""
    if is_peft_model(model):
        model = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
