"""Overhead of ConfidenceDPOTrainer (online confidence + probe update) over TRL's DPOTrainer.

Same model (the real SmolLM2-135M-Instruct), same rendered XSTest pairs (the first N whose prompt + both responses
fit in max_length, so that the probe reads and learns from every pair), same settings. Each optimiser step is timed
inside `trainer.train()`, from `on_step_begin` to `on_step_end` (forward, backward, the probe step, the optimiser
step): wall seconds and CPU seconds of this process (less sensitive to other processes on a shared machine).
The trainers alternate one step at a time in an A/B/B/A pattern, both on the same batch in each round (the round
number seeds the data order), after one warm-up step each. Equal work is checked, not assumed: each side counts
the tokens (attention-mask ones) its loss saw in every step, and the benchmark prints both, with the policy and
reference FLOPs they imply (`rbrm.flops`). Both use TRL's fused LM head (`compact_lm_head=False`). The last line
is `ratio=<ours/TRL>` (median wall s/step).

    python benchmarks/bench_dpo_overhead.py                # LoRA r=8, batch 4, max_length 128
    python benchmarks/bench_dpo_overhead.py --full         # full fine-tune, fp32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_TELEMETRY", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from rbrm.machine import machine_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data/xstest/derived_unsafe_prompt_pairs_pku_format.jsonl"


class CountingDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, counting the tokens its loss sees in training as ours does (nothing else changes)."""

    loss_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            self.loss_tokens += int(inputs["attention_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class StepTimer(TrainerCallback):
    """Wall and process CPU time of each optimiser step."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def build_probe(model, tokenizer, pairs, layers):
    """A hybrid reward trained briefly on the policy's own states of other pairs (quality is not measured here)."""
    from rbrm.features import examples_to_rows, extract_features, feature_metadata
    from rbrm.reward_model import RewardTrainConfig, train_reward_model

    rows, _, pair_index = examples_to_rows(pairs, [])
    features = extract_features(model, tokenizer, rows, layers, "last", progress=False)
    probe, _ = train_reward_model(features, pair_index, None, RewardTrainConfig(epochs=30, val_fraction=0.0),
                                  config=feature_metadata(model, tokenizer, layers, "last"), progress=False)
    return probe


def training_rows(tokenizer, n: int, max_length: int) -> tuple[list[dict], list]:
    """The first `n` rendered XSTest pairs whose prompt + either response fit in `max_length` (so the probe reads
    every pair's end-of-turn token), and up to `n` of the other pairs (to train the probe on)."""
    from rbrm.formats import load_pairs
    from rbrm.render import render, tokenize

    rows, rest = [], []
    for pair in load_pairs(DATA):
        prompt, chosen = render(tokenizer, pair.prompt, pair.chosen)
        _, rejected = render(tokenizer, pair.prompt, pair.rejected)
        longest = max(sum(map(len, tokenize(tokenizer, prompt, c))) for c in (chosen, rejected))
        if longest <= max_length and len(rows) < n:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif len(rest) < n:
            rest.append(pair)
    return rows, rest


def pipeline_trainer(policy, tokenizer, rows: list[dict], probe, output_dir: str, callbacks=None, **changes):
    """One-step confidence-DPO trainer as configs/compare.yaml trains (LoRA r 16 on q/k/v/o, batch 4,
    max_length 128, lr 5e-4, beta 0.1; bf16 where it is the CPU's faster precision), for the step benchmarks."""
    from datasets import Dataset
    from peft import LoraConfig

    from rbrm.dpo import ConfidenceDPOConfig, ConfidenceDPOTrainer
    from rbrm.precision import cpu_prefers_bf16

    values = dict(confidence="online", per_device_train_batch_size=4, max_length=128, max_steps=1,
                  learning_rate=5e-4, beta=0.1, use_cpu=True, bf16=cpu_prefers_bf16(), report_to="none",
                  save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    args = ConfidenceDPOConfig(output_dir=output_dir, **{**values, **changes})
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return ConfidenceDPOTrainer(policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                peft_config=lora, reward_model=probe, callbacks=callbacks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per trainer (after one warm-up step)")
    parser.add_argument("--full", action="store_true", help="full fine-tune (default: LoRA r=8 on q/k/v/o)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)

    from datasets import Dataset
    from peft import LoraConfig

    from rbrm.dpo import ConfidenceDPOConfig, ConfidenceDPOTrainer
    from rbrm.models import load_model, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_model(path, dtype="float32", device="cpu")
    rows, rest = training_rows(tokenizer, options.pairs, options.max_length)
    layers = list(range(1, model.config.num_hidden_layers + 1))
    probe = build_probe(model, tokenizer, rest, layers)
    dataset = Dataset.from_list(rows)

    common = dict(per_device_train_batch_size=options.batch_size, max_length=options.max_length,
                  max_steps=1, learning_rate=5e-4 if not options.full else 1e-6, beta=0.1,
                  use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
                  gradient_checkpointing=options.gradient_checkpointing, disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)
    peft_config = None if options.full else LoraConfig(r=8, lora_alpha=16,
                                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    def make(kind: str):
        policy, _ = load_model(path, dtype="float32", device="cpu")
        timer = StepTimer()
        out = f"/tmp/bench_dpo_overhead/{kind}"
        if kind == "ours":
            # TRL's own LM head on both sides: this measures the confidence and the probe, not rbrm.dpo.lm_head
            # (bench_dpo_step.py measures that)
            args = ConfidenceDPOConfig(output_dir=out, confidence="online", compact_lm_head=False, **common)
            trainer = ConfidenceDPOTrainer(policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                                           peft_config=peft_config, reward_model=probe, callbacks=[timer])
        else:
            ref = None if peft_config else load_model(path, dtype="float32", device="cpu")[0]
            args = DPOConfig(output_dir=out, **common)
            trainer = CountingDPOTrainer(policy, ref_model=ref, args=args, train_dataset=dataset,
                                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
        return trainer, timer

    del model
    trainers = {kind: make(kind) for kind in ("trl", "ours")}

    tokens: dict[str, list[int]] = {"trl": [], "ours": []}
    flops: list[int] = []

    def counted(kind: str) -> int:
        trainer = trainers[kind][0]
        return trainer.loss_tokens if kind == "trl" else trainer.forward_tokens // (1 if trainer.reference_precomputed
                                                                                     else 2)

    def step(kind: str, seed: int) -> None:
        trainer, _ = trainers[kind]
        trainer.args.seed = seed  # the same batch for both trainers in a round
        before, before_flops = counted(kind), getattr(trainer, "flops", 0)
        trainer.train()
        tokens[kind].append(counted(kind) - before)
        if kind == "ours":
            flops.append(trainer.flops - before_flops)

    for kind in ("trl", "ours"):  # warm-up
        step(kind, 0)
        trainers[kind][1].wall.clear()
        trainers[kind][1].cpu.clear()
        tokens[kind].clear()
    flops.clear()
    for round_index in range(options.rounds):
        order = ("trl", "ours") if round_index % 2 == 0 else ("ours", "trl")
        for kind in order:
            step(kind, round_index + 1)
        print(f"round {round_index + 1}: " + ", ".join(
            f"{kind} {trainers[kind][1].wall[-1]:.2f} s ({trainers[kind][1].cpu[-1]:.2f} s CPU)"
            for kind in ("trl", "ours")), flush=True)

    wall, cpu = {}, {}
    for kind, (_, timer) in trainers.items():
        wall[kind], cpu[kind] = statistics.median(timer.wall), statistics.median(timer.cpu)
        print(f"{kind:>4}: median {wall[kind]:.3f} s/step wall (mean {statistics.mean(timer.wall):.3f}), "
              f"{cpu[kind]:.3f} s/step CPU, over {len(timer.wall)} steps")
    if tokens["trl"] != tokens["ours"]:
        raise SystemExit(f"unequal work: tokens per step trl {tokens['trl']}, ours {tokens['ours']}")
    print(f"equal work: both sides' losses saw the same {sum(tokens['ours'])} tokens over {len(tokens['ours'])} steps "
          f"({statistics.mean(tokens['ours']):.0f}/step); ours: {statistics.mean(flops):.3g} FLOPs/step by rbrm.flops "
          "(policy forward + backward, reference forward, and the probe, which TRL's side does not run)")
    ours = trainers["ours"][0]
    metrics = [entry for entry in ours.state.log_history if "probe/accuracy" in entry]
    if metrics:
        print(f"ours, last logged step: confidence/mean {metrics[-1]['confidence/mean']:.3f}, probe/accuracy "
              f"{metrics[-1]['probe/accuracy']:.2f}, probe/truncated {metrics[-1]['probe/truncated']:.2f}; "
              f"probe steps {ours.probe_steps}")
    setting = "full fp32" if options.full else "LoRA r=8"
    print(f"setting: {setting}, batch {options.batch_size}, max_length {options.max_length}, {len(rows)} pairs, "
          f"{len(layers)} probed layers, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print(f"ratio_cpu={cpu['ours'] / cpu['trl']:.3f}")
    print(f"machine: {machine_summary()}")
    print(f"ratio={wall['ours'] / wall['trl']:.3f}")


if __name__ == "__main__":
    main()
