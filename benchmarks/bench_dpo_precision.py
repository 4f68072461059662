"""Confidence-DPO step time in fp32 against bf16 autocast (`bf16=True`, which on CPU is torch's CPU autocast).

The DPO stages take most of `make compare`'s time on a CPU. This measures what bf16 autocast would save there:
two `ConfidenceDPOTrainer`s on the real SmolLM2-135M-Instruct, the same XSTest pairs and probe, the pipeline's
LoRA (r 16 on q/k/v/o), batch 4, max_length 128, all layers probed; they alternate one optimiser step at a time
on the same batch (A/B/B/A), after one warm-up step each, timed inside `trainer.train()` as in
`bench_dpo_overhead.py`. On a CPU without native bf16 instructions autocast is emulated and may be slower.
The last line is `ratio=<fp32/bf16>` (median wall s/step).

    python benchmarks/bench_dpo_precision.py [--rounds 6] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo_overhead import DATA, StepTimer, build_probe  # noqa: E402

from rbrm.data import load_pairs  # noqa: E402
from rbrm.machine import machine_summary  # noqa: E402
from rbrm.models import load_model, resolve_model  # noqa: E402
from rbrm.render import render, tokenize  # noqa: E402
from rbrm.trainer import ConfidenceDPOConfig, ConfidenceDPOTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per precision (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    path = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_model(path, dtype="float32", device="cpu")
    rows, rest = [], []
    for pair in load_pairs(DATA):
        prompt, chosen = render(tokenizer, pair.prompt, pair.chosen)
        _, rejected = render(tokenizer, pair.prompt, pair.rejected)
        longest = max(sum(map(len, tokenize(tokenizer, prompt, c))) for c in (chosen, rejected))
        if longest <= 128 and len(rows) < options.pairs:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif len(rest) < options.pairs:
            rest.append(pair)
    probe = build_probe(model, tokenizer, rest, list(range(1, model.config.num_hidden_layers + 1)))
    del model
    dataset = Dataset.from_list(rows)
    trainers = {}
    for kind in ("fp32", "bf16"):
        policy, _ = load_model(path, dtype="float32", device="cpu")
        timer = StepTimer()
        args = ConfidenceDPOConfig(output_dir=f"/tmp/bench_dpo_precision/{kind}", confidence="online",
                                   per_device_train_batch_size=4, max_length=128, max_steps=1, learning_rate=5e-4,
                                   beta=0.1, use_cpu=True, bf16=kind == "bf16", report_to="none", save_strategy="no",
                                   logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        trainers[kind] = (ConfidenceDPOTrainer(policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                                               peft_config=lora, reward_model=probe, callbacks=[timer]), timer)
    for round_index in range(options.rounds + 1):
        for kind in ("fp32", "bf16") if round_index % 2 else ("bf16", "fp32"):
            trainer, _ = trainers[kind]
            trainer.args.seed = round_index  # the same batch for both in a round
            trainer.train()
        if round_index == 0:  # warm-up
            for _, timer in trainers.values():
                timer.wall.clear()
            continue
        print(f"round {round_index}: " + ", ".join(f"{k} {t.wall[-1]:.2f} s" for k, (_, t) in trainers.items()),
              flush=True)
    median = {kind: statistics.median(timer.wall) for kind, (_, timer) in trainers.items()}
    print(f"median s/step: fp32 {median['fp32']:.2f}, bf16 {median['bf16']:.2f}, over {options.rounds} steps; "
          f"torch threads {torch.get_num_threads()}")
    print(f"machine: {machine_summary()}")
    print(f"ratio={median['fp32'] / median['bf16']:.2f}")


if __name__ == "__main__":
    main()
