"""Sampling: batched (`rbrm sample`'s path) against one prompt at a time, then re-ranking throughput; one run.

Batched: 8 prompts x N samples in one `generate` call (left padding), through `generate_responses`.
One at a time: a loop over the prompts, `generate(num_return_sequences=N)` per prompt.
Same model, dtype and settings (the paper's sampling settings, 48 new tokens). Both runs suppress EOS until
48 tokens (`min_new_tokens`), so they generate exactly the same number of tokens and the seconds compare
like for like. Each path is warmed up first. Re-ranking: the 64 batched samples scored with a random hybrid
reward over all layers (scoring cost does not depend on the weights). The last line is
`ratio=<one-at-a-time seconds / batched seconds>`.

    .venv/bin/python benchmarks/bench_sampling.py [--prompts 8] [--n 8] [--max-new-tokens 48] [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rbrm.formats import load_prompts
from rbrm.machine import machine_summary
from rbrm.models import load_model, model_fingerprint
from rbrm.render import render_prompt
from rbrm.rerank import Sample, score_samples
from rbrm.reward_model import HybridRewardModel
from rbrm.sampling import DecodingConfig, generate_responses, stop_token_ids

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "advbench", "harmful_behaviors.csv")


def one_at_a_time(model, tokenizer, prompts, n: int, settings: DecodingConfig, seed: int) -> int:
    """The simple loop: one generate call per prompt with num_return_sequences=N; returns tokens made."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_k=settings.top_k,
                              top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                              max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, num_return_sequences=n)
    torch.manual_seed(seed)
    made = 0
    for record in prompts:
        ids = tokenizer(render_prompt(tokenizer, record.prompt), add_special_tokens=False,
                        return_tensors="pt")["input_ids"].to(model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = out[:, ids.shape[1]:]
        for row in new.tolist():
            stop = next((i for i, t in enumerate(row) if t in stops), None)
            made += len(row) if stop is None else stop + 1
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="auto", help="auto: the precision the pipeline samples in")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load_model(None, dtype=args.dtype, device=args.device)
    prompts = load_prompts(DATA, limit=args.prompts)
    settings = DecodingConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    dtype = str(model.dtype).removeprefix("torch.")
    print(f"model {model.config.name_or_path} ({dtype}, {args.device}, {torch.get_num_threads()} threads); "
          f"{len(prompts)} prompts x N {args.n}, {args.max_new_tokens} new tokens, settings {settings}")

    warm = DecodingConfig(max_new_tokens=4)
    generate_responses(model, tokenizer, prompts, args.n, warm, batch_prompts=len(prompts), progress=False)
    one_at_a_time(model, tokenizer, prompts[:1], args.n, warm, args.seed)

    stats: dict = {}
    start = time.perf_counter()
    rows = generate_responses(model, tokenizer, prompts, args.n, settings, batch_prompts=len(prompts),
                              max_sequences=len(prompts) * args.n, seed=args.seed, progress=False, stats=stats)
    batched_s = time.perf_counter() - start
    batched_tokens = stats["generated_tokens"]
    print(f"batched ({len(prompts)} prompts x {args.n} per call): {batched_tokens} tokens in {batched_s:.1f} s, "
          f"{batched_tokens / batched_s:.1f} tokens/s")

    start = time.perf_counter()
    single_tokens = one_at_a_time(model, tokenizer, prompts, args.n, settings, args.seed)
    single_s = time.perf_counter() - start
    print(f"one prompt at a time (num_return_sequences={args.n}): {single_tokens} tokens in {single_s:.1f} s, "
          f"{single_tokens / single_s:.1f} tokens/s")

    torch.manual_seed(0)
    layers = model.config.num_hidden_layers
    reward = HybridRewardModel(layers, model.config.hidden_size,
                               {"layers": list(range(1, layers + 1)), "pooling": "last",
                                "model": model_fingerprint(model)})
    with torch.no_grad():
        reward.weight.normal_()
    samples = [Sample(r["prompt_id"], r["prompt"], r["response"], r["sample_index"], i) for i, r in enumerate(rows)]
    score_samples(model, tokenizer, reward, samples[: args.n], progress=False)  # warm-up
    start = time.perf_counter()
    score_samples(model, tokenizer, reward, samples, progress=False)
    rerank_s = time.perf_counter() - start
    print(f"re-ranking ({len(samples)} samples, {layers} layers): {rerank_s:.1f} s, "
          f"{len(samples) / rerank_s:.1f} samples/s")
    print(f"machine: {machine_summary()}")
    print(f"ratio={single_s / batched_s:.2f}")


if __name__ == "__main__":
    main()
