"""glibc's defaults against `rbrm.memory.keep_freed_memory` (what every `rbrm` command now does), side by side.

mallopt cannot be undone inside a process, so two worker processes run the same work, one with
RBRM_KEEP_FREED_MEMORY=0 (glibc's defaults) and one with the setting, taking turns one round at a time (the
order reversed every other round), after one warm-up round each. A round is what a pipeline run repeats: one
confidence-DPO step as the pipeline trains (SmolLM2-135M-Instruct, LoRA r 16 on q/k/v/o, batch 4, max_length
128, all layers probed; bf16 autocast where it is the CPU's faster precision) and one batched greedy generation
(32 AdvBench prompts x 48 tokens, the inference dtype). Each worker reports its wall seconds and page faults per round. The
last line is `ratio=<defaults / kept, median seconds per round>`.

    python benchmarks/bench_allocator.py [--rounds 4] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"defaults": "0", "kept": "1"}
MARK = "bench_allocator: "  # a worker's result lines; the trainer prints to stdout too


def result(proc: subprocess.Popen) -> dict:
    for line in proc.stdout:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError("a worker ended without a result (its error is above)")


def worker(threads: int | None) -> None:
    """Set up once, then one round per line read from stdin; one JSON line per round on stdout."""
    import torch
    from bench_dpo_overhead import build_probe, pipeline_trainer, training_rows

    from rbrm.formats import load_prompts
    from rbrm.memory import keep_freed_memory
    from rbrm.models import load_model, resolve_model
    from rbrm.sampling import DecodingConfig, hf_backend, render_prompt

    took = keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_model(path, dtype="float32", device="cpu")
    rows, rest = training_rows(tokenizer, 32, 128)
    probe = build_probe(model, tokenizer, rest, list(range(1, model.config.num_hidden_layers + 1)))
    del model
    policy, _ = load_model(path, dtype="float32", device="cpu")
    trainer = pipeline_trainer(policy, tokenizer, rows, probe, "/tmp/bench_allocator")
    sampler, _ = load_model(path, dtype="auto", device="cpu")
    generate = hf_backend(sampler, tokenizer, DecodingConfig.greedy(48, 1.0))
    texts = [render_prompt(tokenizer, p.prompt) for p in load_prompts(ROOT / "data/advbench/harmful_behaviors.csv", limit=32)]
    print(MARK + json.dumps({"ready": True, "kept": took}), flush=True)
    for round_index, _ in enumerate(sys.stdin):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        trainer.args.seed = round_index  # the same batch on both sides in a round
        trainer.train()
        dpo = time.perf_counter() - start
        generate(texts, [1] * len(texts), 0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(MARK + json.dumps({"seconds": time.perf_counter() - start, "dpo_seconds": dpo,
                          "page_faults": after.ru_minflt - before.ru_minflt,
                          "system_seconds": after.ru_stime - before.ru_stime}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per side (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.threads)
        return
    from rbrm.machine import machine_summary
    from rbrm.memory import glibc

    if glibc() is None:
        raise SystemExit("the C library is not glibc: keep_freed_memory does nothing here")
    command = [sys.executable, __file__, "--worker"] + (["--threads", str(options.threads)] if options.threads else [])
    workers = {name: subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "RBRM_KEEP_FREED_MEMORY": value})
               for name, value in SIDES.items()}
    for name, proc in workers.items():
        ready = result(proc)
        assert ready["kept"] == (name == "kept"), ready
    results: dict[str, list[dict]] = {name: [] for name in workers}
    names = list(workers)
    for round_index in range(options.rounds + 1):
        for name in names if round_index % 2 else names[::-1]:
            workers[name].stdin.write("round\n")
            workers[name].stdin.flush()
            measured = result(workers[name])
            if round_index:  # round 0 warms up
                results[name].append(measured)
        if round_index:
            print(f"round {round_index}: " + ", ".join(
                f"{n} {r[-1]['seconds']:.2f} s ({r[-1]['page_faults']} faults)" for n, r in results.items()), flush=True)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    median = {n: statistics.median(r["seconds"] for r in rs) for n, rs in results.items()}
    for n, rs in results.items():
        print(f"{n}: median {median[n]:.2f} s/round (DPO step {statistics.median(r['dpo_seconds'] for r in rs):.2f} s), "
              f"page faults {statistics.median(r['page_faults'] for r in rs):.0f}/round, "
              f"system time {statistics.median(r['system_seconds'] for r in rs):.2f} s/round")
    print(f"machine: {machine_summary()}")
    print(f"ratio={median['defaults'] / median['kept']:.2f}")


if __name__ == "__main__":
    main()
