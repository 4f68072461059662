"""Confidence-DPO step time: TRL's LM head in fp32 (rbrm 0.3), against bf16 autocast and the completion-only head.

The DPO stages take most of `make compare`'s time on a CPU. Four `ConfidenceDPOTrainer`s on the real
SmolLM2-135M-Instruct, the same XSTest pairs and probe, the pipeline's LoRA (r 16 on q/k/v/o), batch 4, max_length
128, all layers probed:

* `trl-fp32`: TRL's fused LM head (on a CPU it scores every position), fp32: the pipeline before rbrm 0.4;
* `trl-bf16`: the same under bf16 autocast (`bf16=True`, torch's CPU autocast);
* `compact-fp32`: `rbrm.dpo.lm_head` (the completion positions only, one log-softmax), fp32: the default on CPUs
  where bf16 is not the faster precision (`rbrm.precision`);
* `compact-bf16`: both: the default on CPUs where bf16 measures faster.

They take turns one optimiser step at a time on the same batch (the order reversed every other round), after one
warm-up step each, timed inside `trainer.train()` as in `bench_dpo_overhead.py`; each side's tokens per step are
counted, so equal work is shown. On a CPU without native bf16 instructions autocast is emulated and may be slower.
The last line is `ratio=<trl-fp32 / the faster compact side>` (median wall s/step).

    python benchmarks/bench_dpo_step.py [--rounds 4] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo_overhead import StepTimer, build_probe, pipeline_trainer, training_rows  # noqa: E402

from rbrm.machine import machine_summary  # noqa: E402
from rbrm.models import load_model, resolve_model  # noqa: E402
from rbrm.precision import cpu_prefers_bf16  # noqa: E402

VARIANTS = {"trl-fp32": (False, False), "trl-bf16": (False, True), "compact-fp32": (True, False),
            "compact-bf16": (True, True)}  # name: (compact_lm_head, bf16)


class TokenTimer(StepTimer):
    """Step times, and the tokens (attention-mask ones) each step's loss saw."""

    def __init__(self, trainer_tokens):
        super().__init__()
        self.trainer_tokens, self.tokens, self._before = trainer_tokens, [], 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._before = self.trainer_tokens()
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.tokens.append(self.trainer_tokens() - self._before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    path = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_model(path, dtype="float32", device="cpu")
    rows, rest = training_rows(tokenizer, options.pairs, 128)
    probe = build_probe(model, tokenizer, rest, list(range(1, model.config.num_hidden_layers + 1)))
    del model
    trainers = {}
    for name, (compact, bf16) in VARIANTS.items():
        policy, _ = load_model(path, dtype="float32", device="cpu")
        trainer = pipeline_trainer(policy, tokenizer, rows, probe, f"/tmp/bench_dpo_step/{name}",
                                   compact_lm_head=compact, bf16=bf16)
        timer = TokenTimer(lambda t=trainer: t.forward_tokens)
        trainer.add_callback(timer)
        trainers[name] = (trainer, timer)
    names = list(VARIANTS)
    for round_index in range(options.rounds + 1):
        for name in names if round_index % 2 else names[::-1]:
            trainer, _ = trainers[name]
            trainer.args.seed = round_index  # the same batch for every variant in a round
            trainer.train()
        if round_index == 0:  # warm-up
            for _, timer in trainers.values():
                timer.wall.clear()
                timer.tokens.clear()
            continue
        print(f"round {round_index}: " + ", ".join(f"{n} {t.wall[-1]:.2f} s" for n, (_, t) in trainers.items()),
              flush=True)
    median = {name: statistics.median(timer.wall) for name, (_, timer) in trainers.items()}
    tokens = {name: sum(timer.tokens) for name, (_, timer) in trainers.items()}
    print("median s/step over " + f"{options.rounds} steps: " + ", ".join(f"{n} {m:.2f}" for n, m in median.items())
          + f"; torch threads {torch.get_num_threads()}")
    print("forward tokens counted (policy + reference): " + ", ".join(f"{n} {t}" for n, t in tokens.items()))
    if len(set(tokens.values())) != 1:
        print("WARNING: the variants did not process the same tokens")
    print(f"machine: {machine_summary()}; bf16 faster here: {cpu_prefers_bf16()}")
    for name in names[1:]:
        print(f"trl-fp32 / {name}: {median['trl-fp32'] / median[name]:.2f}")
    print(f"ratio={median['trl-fp32'] / min(median['compact-fp32'], median['compact-bf16']):.2f}")


if __name__ == "__main__":
    main()
