"""`rbrm sample`: N responses per prompt from the policy (batched, resumable)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..formats import load_prompts
from ..models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from ..sampling import DecodingConfig, generate_responses, vllm_backend


@dataclass
class SampleConfig:
    prompts: str = field(metadata={"help": "prompts file (.jsonl/.json/.csv; any bundled evaluation set)"})
    out: str = field(metadata={"help": "output .jsonl; rerun the same command to resume"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "alias, folder, .gguf or hub id"})
    prompt_field: str | None = field(default=None, metadata={"help": "column holding the prompt (default: detect)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    n: int = field(default=8, metadata={"help": "responses per prompt"})
    temperature: float = 1.4
    top_k: int = 8
    top_p: float = 0.95
    repetition_penalty: float | None = field(
        default=None, metadata={"help": "default 1.2 when sampling (paper), 1.0 with --greedy"})
    max_new_tokens: int = 256
    greedy: bool = field(default=False, metadata={"help": "argmax decoding (evaluation style); needs --n 1"})
    seed: int = 0
    batch_prompts: int = field(default=8, metadata={"help": "prompts per generate call"})
    max_sequences: int = field(default=64, metadata={"help": "cap on sequences (prompts x N) per generate call"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on CUDA; on a CPU the faster of fp32 and bf16 there, measured once per machine; "
                "RBRM_CPU_PRECISION=fp32|bf16 forces it), float32, bfloat16"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    engine: str = field(default="hf", metadata={"help": "hf (transformers) or vllm (GPU only)"})


def settings_from_config(config: SampleConfig) -> DecodingConfig:
    if config.greedy:
        return DecodingConfig.greedy(config.max_new_tokens, config.repetition_penalty or 1.0)
    return DecodingConfig(True, config.temperature, config.top_k, config.top_p,
                              1.2 if config.repetition_penalty is None else config.repetition_penalty,
                              config.max_new_tokens)


def run_sample(config: SampleConfig) -> None:
    settings = settings_from_config(config)
    if config.greedy and config.n != 1:
        raise ConfigError("--greedy gives one response per prompt; use --n 1")
    prompts = load_prompts(config.prompts, prompt_field=config.prompt_field, limit=config.limit)
    if config.engine == "hf":
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        backend = None
    elif config.engine == "vllm":
        path = resolve_model(config.model)
        tokenizer = load_tokenizer(path)
        backend = vllm_backend(path, tokenizer, settings, config.dtype)
        model = path
    else:
        raise ConfigError(f"unknown --engine {config.engine!r}; choose hf or vllm")
    stats: dict = {}
    rows = generate_responses(model, tokenizer, prompts, config.n, settings, config.out, config.batch_prompts,
                              config.seed, max_sequences=config.max_sequences, backend=backend,
                              engine=config.engine, stats=stats)
    finish = Counter(r["finish_reason"] for r in rows)
    rate = stats["generated_tokens"] / max(stats["seconds"], 1e-9)
    skipped = stats["skipped_too_long"]
    print(f"{config.out}: {len(rows)} responses for {len(prompts) - skipped} prompts ({stats['new_rows']} new, "
          f"{stats['generated_tokens']} tokens in {stats['seconds']:.1f} s, {rate:.1f} tokens/s); "
          f"finish: {dict(finish)}" + (f"; skipped {skipped} prompt(s) too long for the context" if skipped else ""))
