"""Safety judges: is a response to a prompt unsafe, and is it a refusal?

Four kinds, one interface (`Judge.judge(prompts, responses) -> list[JudgeResult]`):

* `RefusalPatternJudge` ("refusal"): keyword refusal check, the transparent baseline of the jailbreak
  literature. It assumes every prompt is harmful, so any non-refusal counts as unsafe.
* `PolicyStateJudge` ("states", the default): a logistic-regression head on the frozen packaged
  SmolLM2-135M-Instruct's hidden states of prompt and answer, fitted on careful labels of SmolLM2 answers to
  harmful prompts outside the evaluation sets: the best offline judge measured (docs/evaluation.md).
* `EmbeddingJudge` ("minilm"): all-MiniLM-L6-v2 sentence embeddings and a logistic-regression head trained on
  the human-labelled XSTest and Salad-Bench responses shipped in `data/`.
  No guard model can be downloaded here, so these two are the judges we can build, ship (safetensors + JSON,
  never pickle) and validate on held-out answers; `scripts/judge_builders.py` rebuilds their weights
  reproducibly and their JSON records what they measured.
* `GuardJudge` ("llamaguard", "mdjudge"): a generative guard model from a local folder (Llama Guard 1/2/3,
  MD-Judge v0.1), prompted in its published format, decoded greedily; its score is the first-token
  probability of "unsafe" against "safe", as the Llama Guard model cards describe.

Every judge also reports `refusal` from the same keyword check (`is_refusal`), so refusal counts agree
across judges.

Modules: `base` (the interface and the keyword judge), `states` (the default judge), `minilm` (the embedding
judge), `labelled` (minilm's labelled data, split and metrics), `guard` (guard-model prompts and output parsing); here the one judge factory,
`get_judge`, and `judge_loader`, which checks a judge at once but may load it later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .base import (
    DEFAULT_JUDGE,
    EMPTY_RESPONSE,
    JUDGE_NAMES,
    Judge,
    JudgeResult,
    RefusalPatternJudge,
    check_pairs,
    judge_key,
)
from .guard import (
    GUARD_VARIANTS,
    GuardJudge,
    GuardOutputError,
    build_guard_prompt,
    build_llamaguard_prompt,
    build_mdjudge_prompt,
    guard_categories,
    guess_guard_variant,
    normalise_variant,
    parse_guard_output,
)
from .labelled import (
    REPO_DATA_DIR,
    binary_metrics,
    fit_linear_head,
    load_judge_data,
    read_labelled_csv,
    split_by_prompt,
)
from .minilm import (
    FEATURE_RECIPES,
    MINILM_WEIGHTS,
    WEIGHTS_DIR,
    EmbeddingJudge,
    encoder_flops,
    load_encoder,
    load_linear_head,
    minilm_features,
    minilm_path,
)
from .states import STATES_WEIGHTS, PolicyStateJudge, states_features

PACKAGED_JUDGES = ("states", "minilm", "refusal")  # built from what the repository and its packages ship


def get_judge(name: str = DEFAULT_JUDGE, judge_model: str | None = None, device: str | None = None,
              **kwargs) -> Judge:
    """Judge by name: rbrm's one judge factory. `judge_model` is the guard folder for llamaguard*/mdjudge, or other
    weights (a head's JSON) for states and minilm. Every failure to build one (a bad name, a missing folder or package) is a ConfigError that
    names the judge, so a command shows it as one line."""
    key = judge_key(name)
    if key not in JUDGE_NAMES:
        raise ConfigError(f"unknown judge {name!r}; choose one of {', '.join(JUDGE_NAMES)}")
    if key == "refusal":
        if judge_model:
            raise ConfigError("the 'refusal' judge is a keyword list and takes no judge model")
        return RefusalPatternJudge()
    if key not in PACKAGED_JUDGES and not judge_model:
        raise ConfigError(f"judge {name!r} needs a local model folder (--judge-model PATH); no guard model is "
                          "packaged. Use 'states' (default), 'minilm' or 'refusal' without one.")
    if key not in (*PACKAGED_JUDGES, "llamaguard"):  # a guard variant named by its key
        kwargs["variant"] = "mdjudge" if key == "mdjudge" else key[-1]
    try:
        if key == "states":
            return PolicyStateJudge(weights=judge_model, device=device, **kwargs)
        if key == "minilm":
            return EmbeddingJudge(weights=judge_model, device=device, **kwargs)
        return GuardJudge(judge_model, device=device, **kwargs)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise ConfigError(f"judge {name!r}: {err}") from None


def judge_loader(name: str, judge_model: str | None = None, device: str | None = None) -> Callable[[], Judge]:
    """Check the judge before any generation, but load a guard model only when it is needed.

    The keyword and MiniLM judges are cheap and built at once (so a bad name fails first); a guard model is
    loaded after the policy has been freed, so both never sit in memory together.
    """
    key = judge_key(name)
    if key in JUDGE_NAMES and key not in PACKAGED_JUDGES and judge_model:
        if not (Path(judge_model).expanduser() / "config.json").is_file():
            raise ConfigError(f"judge {name!r}: --judge-model {judge_model} is not a model folder (no config.json)")
        return lambda: get_judge(name, judge_model, device)
    judge = get_judge(name, judge_model, device)
    return lambda: judge


__all__ = [
    "DEFAULT_JUDGE",
    "EMPTY_RESPONSE",
    "EmbeddingJudge",
    "PACKAGED_JUDGES",
    "PolicyStateJudge",
    "STATES_WEIGHTS",
    "FEATURE_RECIPES",
    "GUARD_VARIANTS",
    "GuardJudge",
    "GuardOutputError",
    "JUDGE_NAMES",
    "Judge",
    "JudgeResult",
    "judge_key",
    "MINILM_WEIGHTS",
    "REPO_DATA_DIR",
    "RefusalPatternJudge",
    "WEIGHTS_DIR",
    "binary_metrics",
    "build_guard_prompt",
    "build_llamaguard_prompt",
    "build_mdjudge_prompt",
    "check_pairs",
    "encoder_flops",
    "fit_linear_head",
    "get_judge",
    "judge_loader",
    "guard_categories",
    "guess_guard_variant",
    "load_encoder",
    "load_judge_data",
    "load_linear_head",
    "minilm_features",
    "minilm_path",
    "normalise_variant",
    "parse_guard_output",
    "read_labelled_csv",
    "split_by_prompt",
    "states_features",
]
