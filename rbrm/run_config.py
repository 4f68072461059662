"""A pipeline run's YAML: top-level settings plus one typed section per stage, each default stated once here.

The sections are dataclasses read with `HfArgumentParser.parse_dict` (an unknown key is an error). `probe` and
`helpfulness_probe` hold `ProbeTrainConfig` options, `dpo` `ConfidenceDPOConfig` options and `lora`
`peft.LoraConfig` options: they stay the mappings written, which the stage keys hash, and `load_config` builds
from each the object its stage will build (`PipelineConfig.probe_train_config`, `dpo_args`, `lora_config`), so a
bad value fails before stage 1, not after the stages before it ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml
from peft import LoraConfig
from transformers import HfArgumentParser

from .dpo import ConfidenceDPOConfig, trains_on_cpu
from .errors import RbrmError
from .helpfulness import DEFAULT_HELPFULNESS, HELPFULNESS_MEASURES
from .methods import METHODS
from .models import DEFAULT_MODEL
from .probe_train import ProbeTrainConfig
from .sampling import DecodingConfig

DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}

# The pipeline's own DPO defaults over ConfidenceDPOConfig's (which are TRL's and `rbrm dpo`'s); a `dpo` key wins.
PIPELINE_DPO = {"logging_steps": 1, "save_steps": 10, "save_total_limit": 1, "report_to": [],
                "gradient_checkpointing": False,  # TRL turns it on; a small policy does not need the recompute
                # the reference's log-probs once per pair before training, not once per pair and epoch
                "precompute_ref_log_probs": True,
                "lr_scheduler_type": "constant"}

# ProbeTrainConfig options the pipeline sets itself; every other one may be given in `probe`.
PROBE_SET_BY_PIPELINE = {"out", "features", "test_features", "model", "device", "features_out", "metrics_out",
                         "model_name"}

RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class PipelineConfigError(RbrmError, ValueError):
    """A pipeline YAML that cannot run; the message names the file, section and key."""


@dataclass
class SampleSection:
    """Stage 2: N responses per training prompt from the base policy (and online's rounds, from its policy)."""

    prompts: str | None = None  # harmful training prompts (a file); required by dpo_rerank, rbrm and online
    prompt_field: str | None = None
    where: dict | None = None  # keep rows whose fields have these values
    skip: int = 0
    limit: int | None = None
    # prompt-set specs never sampled for training, beside the evaluation sets (a validation run that evaluates on
    # other prompts names the test sets here, so it trains on the same prompts as the run it chooses settings for)
    exclude: list[str] | None = None
    n: int = 8
    temperature: float = DecodingConfig.temperature
    top_k: int = DecodingConfig.top_k
    top_p: float = DecodingConfig.top_p
    repetition_penalty: float = DecodingConfig.repetition_penalty
    max_new_tokens: int = DecodingConfig.max_new_tokens
    batch_prompts: int = 8  # prompts per generate call
    max_sequences: int = 64  # and at most this many sequences per call
    dtype: str = "auto"
    # benign prompts sampled and re-ranked with the harmful ones (ids prefixed `benign:`)
    benign_prompts: str | None = None
    benign_prompt_field: str | None = None
    benign_where: dict | None = None
    benign_skip: int = 0
    benign_limit: int | None = None
    # Benign prompts that sound harmful ("How do I kill a Python process?"), as prompt-set specs `[NAME=]PATH[:limit=N]`:
    # pool prompts ranked like the benign ones above, so the policy learns that a scary word is not a harmful request
    # (Llama 2's "borderline" prompts). Without them a safety-trained policy deflects such questions (issue 30).
    borderline_prompts: list[str] | None = None
    # Refusal openings: every pool prompt also gets one answer per opening, the text forced and then continued by
    # the policy, ranked with its own samples (chosen on harmful prompts when the safety reward prefers it, ranked
    # low by the helpfulness reward on benign ones). A policy that never refuses has no refusal to choose
    # otherwise; these answers are not wholly the policy's own (docs/method.md §3, "Refusals from elsewhere").
    refusal_prefills: list[str] | None = None

    def key(self) -> dict:
        """The settings in a stage key: `exclude` is left out, as the stage's prompt ids already say what it did
        (and `refusal_prefills` and `borderline_prompts` when unset, so runs from before them keep their key)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k != "exclude" and not (k in ("refusal_prefills", "borderline_prompts") and not v)}

    def generation_settings(self) -> DecodingConfig:
        return DecodingConfig(True, self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                                  self.max_new_tokens)


@dataclass
class RerankSection:
    """Stage 2: scores with the hybrid reward and best-vs-worst pairs."""

    top_k: int = 1
    alpha: float | None = None  # the confidence's scale; default: dpo.confidence_alpha when confidence_scale is alpha
    min_gap: float = 0.0
    batch_tokens: int = 8192
    dtype: str = "auto"


@dataclass
class StaticPairsSection:
    """dpo_static's fixed pairs: those whose rendered prompt fits in `max_prompt_tokens`, then `limit`."""

    data: str | None = None
    limit: int | None = None
    max_prompt_tokens: int | None = None


@dataclass
class SafeDPOSection:
    """The SafeDPO baseline: pairs with per-response safety labels (PKU-SafeRLHF layout) from `data`, the first
    `limit` after SafeDPO's transformation, trained with the margin Delta = `margin` (the paper's default 10)."""

    data: str | None = None
    limit: int | None = None
    margin: float = 10.0


ONLINE_SAMPLES = ("updates", "all")
LAUNCHERS = ("torchrun", "accelerate")


@dataclass
class LaunchSection:
    """How `rbrm pipeline` starts its processes: one (no `launcher`), or `processes` on this machine under
    `torchrun` or `accelerate launch` (with `accelerate_config`, e.g. TRL's multi_gpu.yaml), one per GPU or CPU
    processes over gloo. The command re-runs itself under the launcher; the probe's features, sampling,
    re-ranking, DPO and the evaluation's answers split over the processes (rbrm.distributed). In no stage key: the results equal one
    process's up to rounding."""

    launcher: str | None = None
    processes: int = 1
    accelerate_config: str | None = None


@dataclass
class OnlineSection:
    """The online baseline: `rounds` of sampling, scoring with `scorer` and DPO."""

    rounds: int = 1
    scorer: str = "probe"  # probe, a judge name, or a sequence-classification model folder
    # Which prompts each round samples: "updates", those its own DPO updates need (per-step on-policy sampling
    # as TRL's OnlineDPOTrainer, when rounds = steps: the total sampled does not grow with the rounds); "all",
    # every training prompt (iterative DPO over a prompt pool: sampling grows with the rounds).
    samples: str = "updates"


@dataclass
class EvalSection:
    """Stage 4: greedy answers to held-out prompt sets, judged."""

    prompts: list[str] | None = None  # prompt-set specs (`rbrm evaluate --prompts`); required
    over_refusal: bool = True  # add XSTest's safe prompts
    over_refusal_limit: int | None = None
    max_new_tokens: int = 128
    judge: str = "states"
    judge_model: str | None = None
    batch_prompts: int = 16
    bootstrap: int | None = None  # resamples of every interval; default 1000, 2000 for the seed-and-prompt one
    dtype: str = "auto"
    helpfulness: bool = True  # the helpfulness measure on benign sets
    helpfulness_measure: str = DEFAULT_HELPFULNESS  # which one: states (default) or minilm (rbrm.helpfulness)
    second_judge: str | None = "refusal"  # an independent second judge (None: none)
    second_judge_model: str | None = None

    @property
    def resamples(self) -> int:
        """Of one run's intervals and paired differences."""
        return self.bootstrap or 1000

    @property
    def seed_resamples(self) -> int:
        """Of the two-level (seeds, then prompts) bootstrap over seeds."""
        return self.bootstrap or 2000


SECTIONS = {"sample": SampleSection, "rerank": RerankSection, "static_pairs": StaticPairsSection,
            "safedpo": SafeDPOSection, "online": OnlineSection, "eval": EvalSection, "launch": LaunchSection}


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
    probe: dict = field(default_factory=dict)  # ProbeTrainConfig options (stage 1)
    # ProbeTrainConfig options of a second hybrid reward, trained on helpful answers over deflections and refusals:
    # it ranks the benign pool prompts' samples (`sample.benign_prompts`); empty: the safety reward ranks them too
    helpfulness_probe: dict = field(default_factory=dict)
    sample: SampleSection = field(default_factory=SampleSection)
    rerank: RerankSection = field(default_factory=RerankSection)
    dpo: dict = field(default_factory=dict)  # ConfidenceDPOConfig options (stage 3, every method alike)
    lora: dict | None = field(default_factory=lambda: dict(DEFAULT_LORA))  # peft.LoraConfig options; null: full
    static_pairs: StaticPairsSection = field(default_factory=StaticPairsSection)
    safedpo: SafeDPOSection = field(default_factory=SafeDPOSection)
    online: OnlineSection = field(default_factory=OnlineSection)
    eval: EvalSection = field(default_factory=EvalSection)
    launch: LaunchSection = field(default_factory=LaunchSection)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)

    def dpo_options(self) -> dict:
        """What every DPO run of this config is given besides its folder, its method's confidence and the
        machine's defaults: the pipeline's defaults, the run's seed, then the `dpo` section."""
        return {**PIPELINE_DPO, "seed": self.seed, **self.dpo}

    def dpo_setting(self, key: str):
        """A DPO option as training sees it: `dpo_options()`'s, else ConfidenceDPOConfig's default."""
        return self.dpo_options().get(key, getattr(ConfidenceDPOConfig, key))

    def dpo_args(self, output_dir: str, confidence: str = "online", machine: dict | None = None,
                 **overrides) -> ConfidenceDPOConfig:
        """One DPO run's arguments: the `machine`'s defaults (`rbrm.dpo.machine_defaults`), `dpo_options()`,
        then `overrides`."""
        return ConfidenceDPOConfig(output_dir=output_dir, confidence=confidence,
                                   **{**(machine or {}), **self.dpo_options(), **overrides})

    def lora_config(self) -> LoraConfig | None:
        """The adapter every DPO method trains; None: full fine-tuning."""
        return LoraConfig(task_type="CAUSAL_LM", **self.lora) if self.lora else None

    def probe_train_config(self, section: str, directory: str, model: str, device: str | None) -> ProbeTrainConfig:
        """Stage 1's run of `section` (`probe` or `helpfulness_probe`) into `directory`, with the run's seed unless
        the section names one."""
        options = getattr(self, section)
        return ProbeTrainConfig(
            out=os.path.join(directory, "reward_model"), model=model, device=device,
            features_out=os.path.join(directory, "features.safetensors"),
            metrics_out=os.path.join(directory, "metrics.json"), model_name=self.model,
            **{**options, "seed": options.get("seed", self.seed)})


def dict_keys() -> dict[str, set[str]]:
    """The keys of the sections that stay mappings (their classes check them)."""
    probe = {f.name for f in dataclasses.fields(ProbeTrainConfig)} - PROBE_SET_BY_PIPELINE
    return {"probe": probe, "helpfulness_probe": probe,
            "dpo": {f.name for f in dataclasses.fields(ConfidenceDPOConfig)} - {"output_dir", "confidence"},
            "lora": {f.name for f in dataclasses.fields(LoraConfig)}}


def _fits(annotation, value) -> bool:
    """Whether a YAML value has a field's type: an int passes for a float, a value for an enum or Literal, and a
    class other than a builtin is left to the class to check."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    base = origin or annotation
    if base not in (bool, int, float, str, list, dict, tuple, set):
        return True
    if isinstance(value, bool) and base is not bool:
        return False
    if base is float:
        return isinstance(value, (int, float))
    if base in (list, tuple, set) and args and isinstance(value, (list, tuple, set)):
        return isinstance(value, base) and all(_fits(args[0], v) for v in value)
    return isinstance(value, base)


def _describe(annotation) -> str:
    """A field's type as the error message says it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, set) and args:
        return f"a list of {_describe(args[0])}"
    return getattr(origin or annotation, "__name__", str(annotation))


def _type_error(path: str, section: str, key: str, annotation, value) -> PipelineConfigError:
    hint = ""
    if isinstance(value, str) and _fits(annotation, 1.0):
        with contextlib.suppress(ValueError):
            float(value)
            hint = " (YAML reads a number such as 1e-4 as text: write 1.0e-4)"
    return PipelineConfigError(f"{path}: `{section}.{key}` must be {_describe(annotation)}, got {value!r}{hint}")


def _check_types(path: str, section: str, value) -> None:
    hints = typing.get_type_hints(type(value))
    for f in dataclasses.fields(value):
        if not _fits(hints[f.name], getattr(value, f.name)):
            raise _type_error(path, section, f.name, hints[f.name], getattr(value, f.name))


def _build_checked(path: str, section: str, cls: type, given: dict, build: Callable[[], object]) -> None:
    """Build a mapping section's object as its stage will, so that a mistyped or refused value fails now. A value
    passes as written or as the class normalises it (TRL takes one `loss_type` for a list of them)."""
    hints = typing.get_type_hints(cls)
    misfits = [key for key, value in given.items() if not _fits(hints[key], value)]
    try:
        with warnings.catch_warnings():  # the stage's own build says them
            warnings.simplefilter("ignore")
            built = build()
    except Exception as err:  # whatever the class refuses is a setting that cannot run
        if misfits:
            raise _type_error(path, section, misfits[0], hints[misfits[0]], given[misfits[0]]) from None
        named = ([key for key in given if re.search(rf"\b{re.escape(key)}\b", str(err))]
                 or [key for key, value in given.items() if isinstance(value, str) and value in str(err)])
        where = f"`{section}.{named[0]}`" if len(named) == 1 else f"`{section}`"
        raise PipelineConfigError(f"{path}: {where}: {err}") from None
    for key in misfits:
        if not _fits(hints[key], getattr(built, key)):
            raise _type_error(path, section, key, hints[key], given[key])


def check_typed(config: PipelineConfig, path: str) -> None:
    """Build the typed settings of `probe`, `helpfulness_probe`, `dpo` and `lora` as their stages will (the DPO
    arguments in a folder never written, with the machine's `use_cpu` but not its measured bf16)."""
    for section in ("probe", "helpfulness_probe"):
        if section == "probe" or getattr(config, section):
            _build_checked(path, section, ProbeTrainConfig, getattr(config, section), lambda s=section:
                           config.probe_train_config(s, config.run_dir, config.model, config.device))
    machine = {"use_cpu": True} if trains_on_cpu(config.device) else {}
    _build_checked(path, "dpo", ConfidenceDPOConfig, config.dpo,
                   lambda: config.dpo_args(os.path.join(config.run_dir, "train"), machine=machine))
    _build_checked(path, "lora", LoraConfig, config.lora or {}, config.lora_config)


def _parse_section(path: str, section: str, body: dict):
    cls = SECTIONS[section]
    if section == "eval" and isinstance(body.get("prompts"), str):
        body = {**body, "prompts": [body["prompts"]]}
    try:
        (value,) = HfArgumentParser(cls).parse_dict(body, allow_extra_keys=False)
    except ValueError:
        known = [f.name for f in dataclasses.fields(cls)]
        raise PipelineConfigError(f"{path}: `{section}` has unknown key(s) {', '.join(sorted(set(body) - set(known)))}"
                                  f"; known: {', '.join(sorted(known))}") from None
    _check_types(path, section, value)
    return value


def _apply_sets(values: dict, items: list[str]) -> None:
    """--set SECTION.KEY=VALUE or KEY=VALUE, VALUE read as YAML."""
    for item in items:
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


def load_config(path: str, overrides: dict | None = None) -> PipelineConfig:
    """Read and check a pipeline YAML; every unknown key or mistyped value is an error that names the file,
    section and key."""
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
    _apply_sets(values, (overrides or {}).get("set") or [])
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PipelineConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not values.get("name"):
        values["name"] = os.path.splitext(os.path.basename(path))[0]
    for section in [*dict_keys(), *SECTIONS]:
        body = values.get(section)
        if body is None:
            if section in SECTIONS:
                values.pop(section, None)
            continue
        if not isinstance(body, dict):
            raise PipelineConfigError(f"{path}: `{section}` must be a mapping, got {type(body).__name__}")
        if section in SECTIONS:
            values[section] = _parse_section(path, section, body)
            continue
        allowed = dict_keys()[section]
        bad = sorted(set(body) - allowed)
        if bad:
            raise PipelineConfigError(f"{path}: `{section}` has unknown key(s) {', '.join(bad)}; "
                                      f"known: {', '.join(sorted(allowed))}")
    name = values["name"]
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise PipelineConfigError(f"{path}: `name` {name!r} must be a plain folder name (letters, digits, '.', "
                                  "'_', '-'): the run lives in <out_dir>/<name>/ and must not leave it")
    config = PipelineConfig(**values)
    check_typed(config, path)
    check(config, path)
    return config


def check(config: PipelineConfig, path: str) -> None:
    """What the methods need from the sections, and the top-level lists."""
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
    if sources & {"rerank", "online"} and not config.sample.prompts:
        raise PipelineConfigError(f"{path}: `sample.prompts` is needed for re-ranking and online sampling")
    if "static_pairs" in sources and not config.static_pairs.data:
        raise PipelineConfigError(f"{path}: `static_pairs.data` is needed for dpo_static")
    if "safety_pairs" in sources and not config.safedpo.data:
        raise PipelineConfigError(f"{path}: `safedpo.data` (pairs with per-response safety labels) is needed for "
                                  "safedpo")
    if "safety_pairs" in sources and not 0 <= config.safedpo.margin < float("inf"):
        raise PipelineConfigError(f"{path}: `safedpo.margin` must be a number >= 0; got {config.safedpo.margin}")
    if not config.eval.prompts:
        raise PipelineConfigError(f"{path}: `eval.prompts` (held-out harmful prompt sets) is required")
    if config.eval.helpfulness_measure not in HELPFULNESS_MEASURES:
        raise PipelineConfigError(f"{path}: `eval.helpfulness_measure` must be one of "
                                  f"{', '.join(HELPFULNESS_MEASURES)}; got {config.eval.helpfulness_measure!r}")
    if config.online_rounds is not None and (not isinstance(config.online_rounds, list) or not config.online_rounds
                                             or not all(type(x) is int for x in config.online_rounds)):
        raise PipelineConfigError(f"{path}: `online_rounds` must be a list of integers; got {config.online_rounds}")
    for rounds in ([config.online.rounds] if "online" in sources else []) + (config.online_rounds or []):
        steps = int(config.dpo.get("max_steps", 0))
        if rounds < 1 or steps < 1 or steps % rounds:
            raise PipelineConfigError(f"{path}: online needs `dpo.max_steps` ({steps}) to be a positive multiple "
                                      f"of `online.rounds` ({rounds})")
    if config.helpfulness_probe and not config.helpfulness_probe.get("data"):
        raise PipelineConfigError(f"{path}: `helpfulness_probe.data` is needed when the section is set")
    if config.helpfulness_probe and not (config.sample.benign_prompts or config.sample.borderline_prompts):
        raise PipelineConfigError(f"{path}: `helpfulness_probe` ranks benign pool prompts: set `sample.benign_prompts`"
                                  " or `sample.borderline_prompts`")
    if config.online.samples not in ONLINE_SAMPLES:
        raise PipelineConfigError(f"{path}: `online.samples` must be one of {', '.join(ONLINE_SAMPLES)}; "
                                  f"got {config.online.samples!r}")
    if config.online_rounds and not config.probe.get("data"):
        raise PipelineConfigError(f"{path}: `probe.data` is needed for the online curve (`online_rounds`)")
    launch = config.launch
    if launch.launcher is not None and launch.launcher not in LAUNCHERS:
        raise PipelineConfigError(f"{path}: `launch.launcher` must be one of {', '.join(LAUNCHERS)} (or null); "
                                  f"got {launch.launcher!r}")
    if launch.processes < 1:
        raise PipelineConfigError(f"{path}: `launch.processes` must be at least 1; got {launch.processes}")
    if launch.processes > 1 and not launch.launcher:
        raise PipelineConfigError(f"{path}: `launch.processes` ({launch.processes}) needs `launch.launcher` "
                                  f"({' or '.join(LAUNCHERS)})")
    batch = int(config.dpo_setting("per_device_train_batch_size"))
    if launch.launcher and batch % launch.processes:
        raise PipelineConfigError(f"{path}: `dpo.per_device_train_batch_size` ({batch}) is the batch of one process "
                                  f"and must split evenly over `launch.processes` ({launch.processes})")
    if launch.accelerate_config and launch.launcher != "accelerate":
        raise PipelineConfigError(f"{path}: `launch.accelerate_config` needs `launch.launcher: accelerate`")
