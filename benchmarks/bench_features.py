"""Feature extraction: our extractor (as `rbrm features` runs it) against the naive way, in one run.

The naive way is the paper code's: one sample at a time, `generate(max_new_tokens=1,
output_hidden_states=True)` in fp32, hidden state of every layer at the last input token.
Both run on the same model and the same pairs, alternating chunk by chunk so that machine load hits both
alike; the last line printed is `ratio=<naive s / ours s>`.

    .venv/bin/python benchmarks/bench_features.py [--pairs 64] [--dtype bfloat16] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from rbrm.commands.features import FeaturesConfig
from rbrm.features import examples_to_rows, extract_features
from rbrm.formats import load_pairs
from rbrm.machine import machine_summary
from rbrm.models import load_model
from rbrm.render import render, tokenize

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "hh_rlhf_harmless_test", "derived_pku_format.jsonl")


class PeakMemory:
    """Peak resident memory above the starting level, sampled from /proc (CPU), or CUDA's counter."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self.thread.join()


@torch.inference_mode()
def naive_features(model, tokenizer, rows) -> torch.Tensor:
    out = []
    for prompt, response in rows:
        prompt_ids, completion_ids = tokenize(tokenizer, *render(tokenizer, prompt, response))
        ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
        result = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                                output_hidden_states=True, return_dict_in_generate=True,
                                pad_token_id=tokenizer.pad_token_id)
        first_step = result.hidden_states[0]  # embeddings + one tensor per layer, for the input
        out.append(torch.stack([h[0, -1] for h in first_step[1:]]).float().cpu())
    return torch.stack(out)


def matmul_flops(device: str, dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def timed(device: str, fn, *args, **kwargs):
    with PeakMemory(device) as mem:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return result, seconds, mem.peak


def main() -> None:
    defaults = FeaturesConfig(data="", out="")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--dtype", default=defaults.dtype, help="our extractor's dtype (CLI default: %(default)s)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens)
    parser.add_argument("--chunks", type=int, default=4, help="alternate naive/ours over this many chunks")
    args = parser.parse_args()

    pairs = load_pairs(args.data, limit=args.pairs)
    rows, _, _ = examples_to_rows(pairs, [])
    naive_model, tokenizer = load_model(dtype="float32", device=args.device)
    ours_model, _ = load_model(dtype=args.dtype, device=args.device)
    device = str(naive_model.device)
    n_tokens = sum(len(p) + len(c) for p, c in (tokenize(tokenizer, *render(tokenizer, *r)) for r in rows))

    # Warm up both paths (the first generate call is much slower).
    naive_features(naive_model, tokenizer, rows[:2])
    extract_features(ours_model, tokenizer, rows[:4], progress=False)

    # Interleave the two in chunks so that a change in machine load hits both alike.
    naive_parts, ours_parts, stats = [], [], {}
    naive_s = ours_s = 0.0
    naive_mem = ours_mem = 0
    step = max(2, len(rows) // args.chunks) // 2 * 2  # whole pairs per chunk
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        part, seconds, mem = timed(device, naive_features, naive_model, tokenizer, chunk)
        naive_parts.append(part)
        naive_s, naive_mem = naive_s + seconds, max(naive_mem, mem)
        part, seconds, mem = timed(device, extract_features, ours_model, tokenizer, chunk,
                                   batch_tokens=args.batch_tokens, batch_size=defaults.batch_size,
                                   progress=False, stats=stats)
        ours_parts.append(part)
        ours_s, ours_mem = ours_s + seconds, max(ours_mem, mem)
    naive, ours = torch.cat(naive_parts), torch.cat(ours_parts)
    # Agreement on layers 1..L-1 (the naive last entry is after the final norm; ours is the layer output).
    agree = torch.nn.functional.cosine_similarity(naive[:, :-1], ours[:, :-1], dim=-1).min().item()

    n_layers, hidden = ours_model.config.num_hidden_layers, ours_model.config.hidden_size
    flops_per_token = 2 * sum(p.numel() for n, p in ours_model.named_parameters() if "embed" not in n)
    peak = matmul_flops(device, ours_model.dtype)
    achieved = flops_per_token * stats["forward_tokens"] / ours_s
    longest = max(len(p) + len(c) for p, c in (tokenize(tokenizer, *render(tokenizer, *r)) for r in rows))
    all_states = n_layers * len(rows) * longest * hidden * 4
    print(f"model: {ours_model.config.name_or_path} ({n_layers} layers, hidden {hidden}); device {device}; "
          f"{len(pairs)} pairs = {len(rows)} responses, {n_tokens} tokens as full sequences")
    print(f"naive (generate, 1 sample, fp32):  {naive_s:7.2f} s  {n_tokens / naive_s:7.0f} tokens/s  "
          f"peak extra memory {naive_mem / 2**20:7.1f} MiB")
    print(f"ours  ({args.dtype}, shared prompts, batched): {ours_s:7.2f} s  "
          f"{n_tokens / ours_s:7.0f} tokens/s (sequence tokens), {stats['forward_tokens']} tokens run  "
          f"peak extra memory {ours_mem / 2**20:7.1f} MiB")
    print(f"tokens saved by prompt sharing: {1 - stats['forward_tokens'] / n_tokens:.1%}")
    print(f"matmul peak ({ours_model.dtype}): {peak / 1e9:.1f} GFLOP/s; ours achieves {achieved / 1e9:.1f} GFLOP/s "
          f"= {achieved / peak:.1%} of it")
    print(f"all layers' full-sequence states for every row would take {all_states / 2**20:.0f} MiB")
    print(f"min cosine similarity naive vs ours (layers 1..L-1): {agree:.4f}")
    print(f"machine: {machine_summary()}")
    print(f"ratio={naive_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
