"""The iterative online baseline, (e) in `methods.py`: R rounds of sample from the current policy, score and pair
with a frozen reward, DPO from where the last round stopped; the rounds add up to the same number of updates as
the offline methods. RBRM's claim is that it reaches this safety without sampling during training.

The pipeline's `OnlineStage` (`rbrm.run_stages`) caches each round as a stage and calls the functions here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from peft import PeftModel

from .dpo import ConfidenceDPOConfig, dpo_compute, pairs_dataset, train_dpo
from .errors import ConfigError
from .files import read_jsonl
from .flops import LLAMA_7B, forward_flops
from .layout import sample_files
from .models import load_causal_lm, load_model, load_tokenizer, resolve_dtype
from .render import prompt_length
from .sampling import sample_candidates


class OnlineRoundError(ConfigError):
    """A round that cannot train: every prompt's samples tie under the scorer."""


def round_prompts(prompts: list, r: int, need: int, every: bool) -> list:
    """Round `r`'s prompts: the whole pool (`every`), or the `need` its updates use, cycling through the pool and
    distinct within a round (DPO takes epochs over fewer)."""
    if every:
        return list(prompts)
    return [prompts[(r * need + i) % len(prompts)] for i in range(min(need, len(prompts)))]


def trainable_policy(model_path: str, previous: str | None, lora: bool, device: str | None = None):
    """The policy a round trains: the base (round 0), or the base with the previous round's LoRA adapter, or the
    previous round's full weights; fp32 on CPU."""
    if previous is not None and not lora:
        return load_causal_lm(previous)
    model = load_causal_lm(model_path, dtype=resolve_dtype("auto", device, inference=False))
    return model if previous is None else PeftModel.from_pretrained(model, previous, is_trainable=True)


def sampling_policy(model_path: str, previous: str | None, lora: bool, dtype: str, device: str, base=None):
    """The current policy in the sample stage's precision (bf16 where it is the CPU's faster one): `base` (the
    loaded base policy) in round 0, then the base with the previous round's adapter merged in (or the previous
    round's full weights). With the fp32 training copy round 0 of `make compare` took 425 s, with this 350."""
    if previous is None:
        return base if base is not None else load_model(model_path, dtype=dtype, device=device)[0]
    if not lora:
        return load_model(previous, dtype=dtype, device=device)[0]
    model = load_causal_lm(model_path, dtype=resolve_dtype(dtype, device, inference=True))
    return PeftModel.from_pretrained(model, previous).merge_and_unload().to(device).eval()


def run_round(directory: str, r: int, *, sampler, policy, reference, tokenizer, prompts: list, section, seed: int,
              score_pairs: Callable[[list[str], str], dict], args: ConfidenceDPOConfig, peft_config) -> dict:
    """One round into `directory`: the candidates (`sample_candidates`), scored and paired by `score_pairs(files,
    out_dir)`, then DPO of `policy` against the frozen initial `reference`; the adapter (or weights) to `policy/`."""
    compute = sample_candidates(sampler, tokenizer, prompts, directory, section, seed)
    scored = score_pairs(sample_files(directory, len(section.refusal_prefills or [])), os.path.join(directory, "pairs"))
    if not scored["pairs"]:
        raise OnlineRoundError(f"online round {r}: no pairs, every prompt's samples tie under online.scorer; choose "
                               "a scorer that grades answers")
    train = pairs_dataset(os.path.join(directory, "pairs", "pairs.jsonl"), tokenizer)
    trainer = train_dpo(policy, tokenizer, args, train, ref_model=reference, peft_config=peft_config,
                        save_to=os.path.join(directory, "policy"), log_path=os.path.join(directory, "dpo_log.json"))
    dpo_tokens, dpo_flops = dpo_compute(trainer)
    return {"generated_tokens": compute["generated_tokens"],
            "forward_tokens": compute["forward_tokens"] + scored["forward_tokens"] + dpo_tokens,
            "flops": compute["flops"] + scored["flops"] + dpo_flops,
            "construction_flops": compute["flops"] + scored["flops"],  # sampling and scoring, without DPO
            "pairs": scored["pairs"], "steps": trainer.state.global_step}


def seven_b_scoring_flops(model_path: str, round_dirs: list[str]) -> int:
    """What scoring every online sample with a 7B reward model (LLAMA_7B) would cost: one forward per sample over
    its prompt and response, by formula (the compute curve's comparison)."""
    tokenizer, lengths = load_tokenizer(model_path), []
    for directory in round_dirs:
        for r in read_jsonl(os.path.join(directory, "samples.jsonl")):
            lengths.append(prompt_length(tokenizer, r["prompt"]) + int(r["num_tokens"]))
    return forward_flops(LLAMA_7B, lengths, lm_head=False)
