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

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import yaml
from accelerate.utils import is_peft_model
from peft import LoraConfig, PeftModel
from transformers.trainer_utils import get_last_checkpoint

from . import __version__
from .data import atomic_dir, load_pairs, load_prompts, read_jsonl, write_json, write_jsonl
from .dpo import ConfidenceDPOConfig, ConfidenceDPOTrainer, pairs_dataset
from .errors import RbrmError
from .evaluation import evaluate, judge_loader, load_set, over_refusal_set, parse_prompt_set, set_dir
from .flops import ModelShape, generation_flops
from .helpfulness import HelpfulnessJudge
from .judges import JUDGE_NAMES, get_judge
from .methods import METHODS
from .models import (
    DEFAULT_MODEL,
    cpu_has_fast_bf16,
    default_device,
    load_causal_lm,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from .render import matching_key, prompt_length, render, to_messages, tokenize
from .report import write_report, write_seeds_report
from .rerank import ClassifierReward, rerank_file, write_outputs
from .reward_model import ProbeTrainConfig, run_probe_train
from .sampling import GenerationSettings, generate_responses
from .stages import file_digest, model_digest, read_json, run_stage, stage_key, sum_compute

log = logging.getLogger(__name__)

DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}

# Keys a config section may hold; the rest of each stage's options are set by the pipeline itself.
PROBE_KEYS = {"data", "limit", "test_data", "test_limit", "layers", "pooling", "dtype", "batch_tokens", "epochs",
              "lr", "weight_decay", "batch_size", "margin", "layer_loss_weight", "patience", "val_fraction",
              "seed", "baseline", "cv", "fit", "gate", "inner_folds", "calibration_data"}
SAMPLE_KEYS = {"prompts", "prompt_field", "where", "skip", "limit", "n", "temperature", "top_k", "top_p",
               "repetition_penalty", "max_new_tokens", "batch_prompts", "max_sequences", "dtype",
               "benign_prompts", "benign_prompt_field", "benign_where", "benign_skip", "benign_limit"}
RERANK_KEYS = {"top_k", "alpha", "min_gap", "batch_tokens", "dtype"}
STATIC_KEYS = {"data", "limit", "max_prompt_tokens"}
ONLINE_KEYS = {"rounds", "scorer"}
EVAL_KEYS = {"prompts", "over_refusal", "over_refusal_limit", "max_new_tokens", "judge", "judge_model",
             "batch_prompts", "bootstrap", "dtype", "helpfulness", "second_judge", "second_judge_model"}


RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class PipelineConfigError(RbrmError, ValueError):
    """A pipeline YAML that cannot run; the message names the file, section and key."""


@dataclass
class PipelineConfig:
    """One YAML file: top-level settings plus one section per stage (see configs/quick.yaml)."""

    name: str
    model: str = DEFAULT_MODEL
    out_dir: str = "runs"
    methods: list[str] = field(default_factory=lambda: ["base", "rbrm"])
    seed: int = 0
    seeds: list[int] | None = None  # several seeds: one full run per seed under <run>/seeds/, one report over them
    # the safety-versus-compute curve: online once per number of rounds, each in <run>/curve/online_r<R>/
    online_rounds: list[int] | None = None
    device: str | None = None
    probe: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)
    rerank: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    lora: dict | None = field(default_factory=lambda: dict(DEFAULT_LORA))
    static_pairs: dict = field(default_factory=dict)
    online: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)


def _dpo_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(ConfidenceDPOConfig)} - {"output_dir", "confidence"}


def _lora_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(LoraConfig)}


def load_config(path: str, overrides: dict | None = None) -> PipelineConfig:
    """Read and check a pipeline YAML; every unknown key is an error that names the file and section."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as err:
        raise PipelineConfigError(f"{path}: cannot read the config: {err}") from None
    except yaml.YAMLError as err:
        raise PipelineConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise PipelineConfigError(f"{path}: expected a mapping of settings")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k != "set"})
    for item in (overrides or {}).get("set") or []:  # --set SECTION.KEY=VALUE or KEY=VALUE, VALUE read as YAML
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise PipelineConfigError(f"--set {item!r}: expected KEY=VALUE or SECTION.KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PipelineConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from None
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as text
            with contextlib.suppress(ValueError):
                value = float(value)
        section, dot, name = key.strip().partition(".")
        if not dot:
            values[section] = value
        elif values.get(section) is None or isinstance(values[section], dict):
            values[section] = {**(values.get(section) or {}), name: value}
        else:
            raise PipelineConfigError(f"--set {item!r}: `{section}` is not a section")
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PipelineConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not values.get("name"):
        values["name"] = os.path.splitext(os.path.basename(path))[0]
    sections = {"probe": PROBE_KEYS, "sample": SAMPLE_KEYS, "rerank": RERANK_KEYS, "dpo": _dpo_keys(),
                "lora": _lora_keys(), "static_pairs": STATIC_KEYS, "online": ONLINE_KEYS, "eval": EVAL_KEYS}
    for section, allowed in sections.items():
        body = values.get(section)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise PipelineConfigError(f"{path}: `{section}` must be a mapping, got {type(body).__name__}")
        bad = sorted(set(body) - allowed)
        if bad:
            raise PipelineConfigError(f"{path}: `{section}` has unknown key(s) {', '.join(bad)}; "
                                      f"known: {', '.join(sorted(allowed))}")
    name = values["name"]
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise PipelineConfigError(f"{path}: `name` {name!r} must be a plain folder name (letters, digits, '.', "
                                  "'_', '-'): the run lives in <out_dir>/<name>/ and must not leave it")
    config = PipelineConfig(**values)
    if config.seeds is not None and (not isinstance(config.seeds, list) or not config.seeds or len(set(config.seeds))
                                     != len(config.seeds) or not all(type(x) is int for x in config.seeds)):
        raise PipelineConfigError(f"{path}: `seeds` must be a non-empty list of distinct integers; got {config.seeds}")
    bad_methods = [m for m in config.methods if m not in METHODS]
    if bad_methods or not config.methods:
        raise PipelineConfigError(f"{path}: `methods` must be a non-empty list of {', '.join(METHODS)}; "
                                  f"got {config.methods}")
    trains = [m for m in config.methods if METHODS[m].trains]
    sources = {METHODS[m].pairs for m in trains}
    probed = [m for m in trains if "probe" in METHODS[m].stages]
    if probed and not config.probe.get("data"):
        raise PipelineConfigError(f"{path}: `probe.data` is needed for {', '.join(probed)}")
    if sources & {"rerank", "online"} and not config.sample.get("prompts"):
        raise PipelineConfigError(f"{path}: `sample.prompts` is needed for re-ranking and online sampling")
    if "static_pairs" in sources and not config.static_pairs.get("data"):
        raise PipelineConfigError(f"{path}: `static_pairs.data` is needed for dpo_static")
    if not config.eval.get("prompts"):
        raise PipelineConfigError(f"{path}: `eval.prompts` (held-out harmful prompt sets) is required")
    if config.online_rounds is not None and (not isinstance(config.online_rounds, list) or not config.online_rounds
                                             or not all(type(x) is int for x in config.online_rounds)):
        raise PipelineConfigError(f"{path}: `online_rounds` must be a list of integers; got {config.online_rounds}")
    for rounds in ([int(config.online.get("rounds", 1))] if "online" in sources else []) + (config.online_rounds or []):
        steps = int(config.dpo.get("max_steps", 0))
        if rounds < 1 or steps < 1 or steps % rounds:
            raise PipelineConfigError(f"{path}: online needs `dpo.max_steps` ({steps}) to be a positive multiple "
                                      f"of `online.rounds` ({rounds})")
    if config.online_rounds and not config.probe.get("data"):
        raise PipelineConfigError(f"{path}: `probe.data` is needed for the online curve (`online_rounds`)")
    return config


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
            config = dataclasses.replace(self.config, methods=["online"], online={**self.config.online, "rounds": rounds},
                                         online_rounds=None, seeds=None, name=f"online_r{rounds}",
                                         out_dir=os.path.join(self.config.run_dir, "curve"))
            runs.append((rounds, Pipeline(config, self.config_path, {"probe": self.path("probe")})))
        return runs

    def inference_model(self, dtype: str = "auto"):
        """(model, tokenizer) of the base policy for sampling, scoring and evaluation, loaded once."""
        if dtype not in self._inference:
            self._inference[dtype] = load_model(self.model_path, dtype=dtype, device=self.device)
        return self._inference[dtype]

    def _base_inputs(self) -> dict:
        """In every key: the model's files and rbrm's version (the code itself is not hashed)."""
        return {"model": self.model_path, "model_files": model_digest(self.model_path), "rbrm": __version__}

    # ----------------------------------------------------------------------------------- stage 1

    def probe(self) -> dict:
        section = dict(self.config.probe)
        files = {k: file_digest(section[k]) for k in ("data", "test_data", "calibration_data") if section.get(k)}

        def body(directory: str) -> dict:
            stats: dict = {}
            options = {k: v for k, v in section.items() if k != "seed"}
            run_probe_train(ProbeTrainConfig(
                out=os.path.join(directory, "reward_model"), model=self.model_path, device=self.device,
                features_out=os.path.join(directory, "features.safetensors"),
                metrics_out=os.path.join(directory, "metrics.json"), model_name=self.config.model,
                seed=section.get("seed", self.config.seed), **options), stats)
            return {"forward_tokens": stats.get("forward_tokens", 0), "flops": stats.get("flops", 0)}

        return self._stage("probe", {**self._base_inputs(), "probe": section, "files": files,
                                     "seed": self.config.seed}, body)

    # ----------------------------------------------------------------------------------- stage 2

    def training_prompts(self) -> list:
        """The harmful sampling prompts, then the optional benign ones (the paper's "general" samples, ids
        prefixed `benign:`), each minus any evaluation prompt (case/space-insensitive), then `skip`/`limit`."""
        s = self.config.sample
        evaluation, out, self.excluded_training_prompts = self.evaluation_keys(), [], 0
        for prefix in ("", "benign_"):
            if not s.get(prefix + "prompts"):
                continue
            prompts = load_prompts(s[prefix + "prompts"], prompt_field=s.get(prefix + "prompt_field"),
                                   where=s.get(prefix + "where"))
            kept = [p for p in prompts if matching_key(p.prompt) not in evaluation]
            self.excluded_training_prompts += len(prompts) - len(kept)
            skip, limit = s.get(prefix + "skip", 0), s.get(prefix + "limit")
            kept = kept[skip:skip + limit] if limit else kept[skip:]
            out += [dataclasses.replace(p, id=f"benign:{p.id}") for p in kept] if prefix else kept
        return out

    def evaluation_keys(self) -> set[str]:
        if self.eval_prompt_keys is None:
            self.eval_prompt_keys = {matching_key(p.prompt) for pset in self.eval_sets() for p in load_set(pset)}
        return self.eval_prompt_keys

    def generation_settings(self):
        s = self.config.sample
        defaults = GenerationSettings()
        return GenerationSettings(True, s.get("temperature", defaults.temperature), s.get("top_k", defaults.top_k),
                                  s.get("top_p", defaults.top_p),
                                  s.get("repetition_penalty", defaults.repetition_penalty),
                                  s.get("max_new_tokens", defaults.max_new_tokens))

    def _sample_into(self, model, tokenizer, prompts: list, out_path: str, seed: int) -> dict:
        """Sample `n` responses per prompt into `out_path` (resumable); exact token counts over the file."""
        s = self.config.sample
        n = int(s.get("n", 8))
        rows = generate_responses(model, tokenizer, prompts, n, self.generation_settings(), out_path,
                                  s.get("batch_prompts", 8), seed, max_sequences=s.get("max_sequences", 64))
        sampled = {r["prompt_id"] for r in rows}  # prompts too long for the context were skipped, not prefilled
        length = {str(p.id): prompt_length(tokenizer, p.prompt) for p in prompts if str(p.id) in sampled}
        shape = ModelShape.of(model)
        return {"generated_tokens": sum(int(r["num_tokens"]) for r in rows), "forward_tokens": sum(length.values()) * n,
                "flops": sum(generation_flops(shape, length[str(r["prompt_id"])], int(r["num_tokens"])) for r in rows),
                "responses": len(rows)}

    def sample(self) -> dict:
        s = self.config.sample
        prompts = self.training_prompts()
        inputs = {**self._base_inputs(), "sample": s, "prompts": file_digest(s["prompts"]),
                  **({"benign_prompts": file_digest(s["benign_prompts"])} if s.get("benign_prompts") else {}),
                  "prompt_ids": [str(p.id) for p in prompts], "seed": self.config.seed}

        def body(directory: str) -> dict:
            model, tokenizer = self.inference_model(s.get("dtype", "auto"))
            compute = self._sample_into(model, tokenizer, prompts, os.path.join(directory, "samples.jsonl"),
                                        self.config.seed)
            compute["excluded_eval_prompts"] = self.excluded_training_prompts
            return compute

        return self._stage("sample", inputs, body)

    def _score_and_pair(self, samples_path: str, out_dir: str, scorer: str = "probe") -> dict:
        """Score with the stage-1 hybrid reward on the base policy's states (or with `scorer`, see
        `external_scorer`); write ranking and pairs."""
        r = self.config.rerank
        alpha = r.get("alpha")
        if alpha is None and self.config.dpo.get("confidence_scale", ConfidenceDPOConfig.confidence_scale) == "alpha":
            alpha = self.config.dpo.get("confidence_alpha", ConfidenceDPOConfig.confidence_alpha)
        result = rerank_file(self.model_path, self.path("probe", "reward_model"), samples_path, r.get("top_k", 1),
                             alpha, r.get("min_gap", 0.0), batch_tokens=r.get("batch_tokens", 8192),
                             loaded=self.inference_model(r.get("dtype", "auto")),
                             scorer=None if scorer == "probe" else self.external_scorer(scorer))
        write_outputs(result, out_dir, result.summary["alpha"])
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
        inputs = {"rerank": self.config.rerank, "after": [self.records["probe"]["key"],
                                                          self.records["sample"]["key"]]}
        return self._stage("rerank", inputs, lambda d: self._score_and_pair(
            os.path.join(self.path("sample"), "samples.jsonl"), d))

    def static_pairs(self) -> dict:
        """dpo_static's fixed pairs: those whose rendered prompt fits in `max_prompt_tokens`, then `limit`.

        Multi-turn HH prompts run to hundreds of tokens; in a short DPO window they would leave no room for the
        responses, so they are skipped rather than truncated.
        """
        s = self.config.static_pairs

        def body(directory: str) -> dict:
            tokenizer = load_tokenizer(self.model_path)
            cap, limit, rows = s.get("max_prompt_tokens"), s.get("limit"), []
            for pair in load_pairs(s["data"]):
                if cap is not None and len(tokenize(tokenizer, *render(tokenizer, pair.prompt, pair.chosen))[0]) > cap:
                    continue
                rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
                if limit and len(rows) == limit:
                    break
            if not rows:
                raise PipelineConfigError(f"static_pairs: no pair of {s['data']} has a prompt of at most {cap} tokens")
            write_jsonl(os.path.join(directory, "pairs.jsonl"), rows)
            return {"pairs": len(rows), "flops": 0}  # tokenizing only

        return self._stage("static_pairs", {**self._base_inputs(), "static_pairs": s,
                                            "data": file_digest(s["data"])}, body)

    # ----------------------------------------------------------------------------------- stage 3

    def dpo_args(self, method: str, output_dir: str, **overrides):
        values = {"logging_steps": 1, "save_steps": 10, "save_total_limit": 1, "report_to": [],
                  "gradient_checkpointing": False,  # TRL turns it on; a small policy does not need the recompute
                  # the reference's log-probs once per pair before training, not once per pair and epoch
                  "precompute_ref_log_probs": True,
                  "seed": self.config.seed, "lr_scheduler_type": "constant", **self.config.dpo, **overrides}
        if not torch.cuda.is_available() or self.device == "cpu":
            values.setdefault("use_cpu", True)
            values.setdefault("bf16", self.dpo_bf16())
        return ConfidenceDPOConfig(output_dir=output_dir, confidence=METHODS[method].confidence, **values)

    def dpo_bf16(self) -> bool | None:
        """`dpo.bf16` when set. Else, on a CPU: bf16 autocast where it has native bf16 instructions (AVX512-BF16,
        AMX; a step 1.4x faster, benchmarks/bench_dpo_step.py), fp32 where autocast would be emulated; on CUDA,
        TRL's default (None here)."""
        if "bf16" in self.config.dpo:
            return bool(self.config.dpo["bf16"])
        return cpu_has_fast_bf16() if not torch.cuda.is_available() or self.device == "cpu" else None

    def lora_config(self):
        if not self.config.lora:
            return None
        return LoraConfig(task_type="CAUSAL_LM", **self.config.lora)

    def dpo_settings_of(self, method: str) -> dict:
        """The `dpo` settings that can change this method's training, for its stage key: plain DPO ignores the
        confidence and probe-update ones, so an RBRM ablation does not retrain the methods beside it."""
        precision = {"bf16": self.dpo_bf16()}  # resolved: the same config trains differently on another CPU
        if METHODS[method].confidence != "none":  # the optimiser named even when defaulted: its default was adam before
            return {**self.config.dpo, **precision,
                    "reward_optimizer": self.config.dpo.get("reward_optimizer", ConfidenceDPOConfig.reward_optimizer)}
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
                                           processing_class=tokenizer, peft_config=self.lora_config(),
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
        """R rounds of: sample from the current policy, score and pair with the frozen hybrid reward, DPO."""
        rounds = int(self.config.online.get("rounds", 1))
        steps = int(self.config.dpo["max_steps"]) // rounds
        per_step = (int(self.config.dpo.get("per_device_train_batch_size", 8))
                    * int(self.config.dpo.get("gradient_accumulation_steps", 1)))
        prompts = self.training_prompts()
        need = steps * per_step
        if not prompts:
            raise PipelineConfigError("online: no training prompts left after removing the evaluation prompts")
        after = [self.records["probe"]["key"], stage_key({"prompt_ids": [str(p.id) for p in prompts]})]
        policy_dir, records = None, []
        for r in range(rounds):
            # each round's prompts, cycling through the pool; distinct within a round (DPO takes epochs over fewer)
            chosen = [prompts[(r * need + i) % len(prompts)] for i in range(min(need, len(prompts)))]
            scorer = self.config.online.get("scorer", "probe")
            inputs = {**self._base_inputs(), "round": r, "of": rounds, "sample": self.config.sample,
                      **({"scorer": scorer, "scorer_files": model_digest(scorer) if os.path.isdir(scorer) else None}
                         if scorer != "probe" else {}),
                      "rerank": self.config.rerank, "dpo": self.dpo_settings_of("online"), "lora": self.config.lora,
                      "prompt_ids": [str(p.id) for p in chosen], "after": after, "seed": self.config.seed,
                      "sample_dtype": str(resolve_dtype(self.config.sample.get("dtype", "auto"), self.device,
                                                        inference=True))}
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
        """The current online policy in the precision the sample stage uses (bf16 on CPUs with native bf16): the
        base policy in round 0, then the base with the previous round's LoRA adapter merged in (or the previous
        round's full weights). With the fp32 training copy round 0 of `make compare` took 425 s, with this 350."""
        dtype = self.config.sample.get("dtype", "auto")
        if previous is None:
            return self.inference_model(dtype)[0]
        if not self.config.lora:
            return load_model(previous, dtype=dtype, device=self.device)[0]
        base = load_causal_lm(self.model_path, dtype=resolve_dtype(dtype, self.device, inference=True))
        return PeftModel.from_pretrained(base, previous).merge_and_unload().to(self.device).eval()

    def _online_round(self, directory: str, r: int, prompts: list, previous: str | None, steps: int) -> dict:
        tokenizer = load_tokenizer(self.model_path)
        compute = self._sample_into(self.sampling_policy(previous), tokenizer, prompts,
                                    os.path.join(directory, "samples.jsonl"), self.config.seed + 1000 * (r + 1))
        if previous is None:
            policy = self.training_model()
        elif self.config.lora:
            policy = self.training_model(previous)
        else:
            policy = _load_full(previous)
        scorer = self.config.online.get("scorer", "probe")
        scored = self._score_and_pair(os.path.join(directory, "samples.jsonl"), os.path.join(directory, "pairs"), scorer)
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
                                       peft_config=self.lora_config() if previous is None else None)
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
        specs = e["prompts"] if isinstance(e["prompts"], list) else [e["prompts"]]
        sets = [parse_prompt_set(spec) for spec in specs]
        if e.get("over_refusal", True):
            sets.append(over_refusal_set(e.get("over_refusal_limit")))
        return sets

    def evaluate(self, method: str) -> dict:
        e = self.config.eval
        sets = self.eval_sets()
        model_dir = self.model_path if method == "base" else self.path(method, "model")
        after = [self.records[method]["key"]] if method != "base" else []
        inputs = {**self._base_inputs(), "eval": e, "after": after,
                  "sets": {s.name: file_digest(s.path) for s in sets},
                  "measures": self.eval_measures()}

        def body(directory: str) -> dict:
            model, tokenizer = (self.inference_model(e.get("dtype", "auto")) if method == "base" else
                                load_model(model_dir, dtype=e.get("dtype", "auto"), device=self.device))
            settings = GenerationSettings.greedy(e.get("max_new_tokens", 128))
            loader = judge_loader(e.get("judge", "minilm"), e.get("judge_model"))
            summaries = evaluate(model, tokenizer, sets, loader,
                                 directory, settings, model_info={"name": method, "path": model_dir},
                                 batch_prompts=e.get("batch_prompts", 16), seed=self.config.seed,
                                 resamples=e.get("bootstrap", 1000), plot=False,
                                 helpfulness=self.eval_measures()["helpfulness"],
                                 second_judge=self.second_judge())
            return {"generated_tokens": sum(s["compute"]["generated_tokens"] for s in summaries.values()),
                    **self._eval_flops(model, tokenizer, sets, directory,
                                       loader() if e.get("judge", "minilm") in ("minilm", "refusal") else None)}

        return self._stage(f"{method}/eval", inputs, body)

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
        name = e.get("second_judge", "refusal")
        return {"helpfulness": e.get("helpfulness", True),
                "second_judge": None if not name or name == e.get("judge", "minilm") else name}

    def second_judge(self):
        """The second judge of `eval_measures`, built, or None."""
        name = self.eval_measures()["second_judge"]
        return get_judge(name, self.config.eval.get("second_judge_model")) if name else None

    # -------------------------------------------------------------------------------------- driver

    def _stage(self, name: str, inputs: dict, body: Callable[[str], dict | None]) -> dict:
        record = run_stage(self.path(*name.split("/")), inputs, body, name)
        self.records[name] = record
        return record

    def load_records(self, methods: list[str] | None = None) -> None:
        """The finished stages' records of these methods (default: the config's), running nothing."""
        methods = methods or self.config.methods
        needed = {s for m in methods for s in METHODS[m].stages}
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
        needed = {s for m in trains for s in METHODS[m].stages}
        if "probe" in needed:
            self.probe()
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


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbrm pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pipeline YAML (configs/quick.yaml, compare.yaml, ...)")
    parser.add_argument("--name", help="run name (default: the config's `name`, else its file name)")
    parser.add_argument("--out-dir", "--out_dir", dest="out_dir", help="parent folder of runs (default: runs)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="override the config's methods")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting (the "
                        "value is read as YAML, e.g. --set dpo.learning_rate=1e-4 --set seeds=[0,1]); repeatable")
    parser.add_argument("--report-only", "--report_only", dest="report_only", action="store_true",
                        help="only redraw report.md/json and figures from the finished stages")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, {"name": args.name, "out_dir": args.out_dir, "methods": args.methods,
                                       "device": args.device, "set": args.set})
    start = time.perf_counter()
    if config.seeds:
        report = run_seeds(config, args.config, args.report_only)
    else:
        pipeline = Pipeline(config, args.config)
        report = pipeline.report_only() if args.report_only else pipeline.run()
    print(open(os.path.join(config.run_dir, "report.md")).read().split("\n## Figures")[0])
    print(f"rbrm pipeline: {config.run_dir} done in {time.perf_counter() - start:.0f} s "
          f"(report.md, report.json; {len(report['methods'])} methods)")
    return 0
