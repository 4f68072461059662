"""Every stage on one device, timed, with the speed goals measured side by side: the CUDA path's check.

    python scripts/gpu_check.py --model-dir DIR [--device cuda] [--tiny] [--out OUT]

DIR is a Hugging Face folder with the model's `config.json` and tokenizer. Weights are optional: speed does not
depend on their values, so without `model.safetensors` the architecture is built with random weights (the
packaged SmolLM2 GGUF is too large to carry to an air-gapped node; `scripts/gpu_wheels.sh` copies its config
and tokenizer). `--tiny` shrinks the architecture to 2 layers of width 64: the CPU smoke test in CI.

Prints one line per stage (`[stage] ... s`), the goals as `ratio=` / `fraction=` lines, and a summary:
  features  ours / naive per-sample generate        (goal >= 10 on a GPU)
  sampling  batched / one prompt at a time          (goal >= 5)
  dpo       confidence-DPO step / plain TRL step    (goal <= 1.05)
  features' and DPO's achieved fraction of the bf16 matmul peak measured in the same run
and the agreement of bf16 features on the device with fp32 features on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_TELEMETRY", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # rbrm from this checkout, installed or not (an air-gapped node may not have it)

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

PAIRS = REPO / "data" / "xstest" / "derived_unsafe_prompt_pairs_pku_format.jsonl"
SAMPLING_PROMPTS = REPO / "data" / "refusal_direction" / "harmful_train.json"
EVAL_PROMPTS = REPO / "data" / "advbench" / "harmful_behaviors.csv"
FEATURE_COSINE_MIN = 0.99  # bf16 on the device vs fp32 on the CPU, per row and layer (bf16 keeps ~3 digits)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn, *args, **kwargs):
    sync(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)
    return result, time.perf_counter() - start


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype`: the achievable peak on this device, measured now."""
    n = 8192 if device.startswith("cuda") else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    reps = 20 if device.startswith("cuda") else 5
    _, seconds = timed(device, lambda: [torch.mm(a, b) for _ in range(reps)])
    return 2 * n**3 * reps / seconds


def build_model(model_dir: str, tiny: bool, dtype: torch.dtype, device: str):
    """(model, tokenizer): the folder's weights if it has them, else its architecture with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rbrm.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    has_weights = any(p.suffix == ".safetensors" for p in Path(model_dir).iterdir())
    if has_weights and not tiny:
        model = load_causal_lm(model_dir, dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(model_dir)
        if tiny:
            config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                           "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval(), tokenizer


class StepStamps(TrainerCallback):
    """The time at the end of every optimiser step (after the device finished it)."""

    def __init__(self, device: str, stamps: list[float]):
        self.device, self.stamps = device, stamps

    def on_step_end(self, *_args, **_kwargs):
        sync(self.device)
        self.stamps.append(time.perf_counter())


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def naive_features(model, tokenizer, rows) -> torch.Tensor:
    """The paper code's way: one sample at a time, generate(max_new_tokens=1, output_hidden_states=True)."""
    from rbrm.render import render, tokenize

    out = []
    for prompt, response in rows:
        ids = torch.tensor([sum(tokenize(tokenizer, *render(tokenizer, prompt, response)), [])], device=model.device)
        result = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                                output_hidden_states=True, return_dict_in_generate=True,
                                pad_token_id=tokenizer.pad_token_id)
        out.append(torch.stack([h[0, -1] for h in result.hidden_states[0][1:]]).float().cpu())
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="HF folder with config.json and the tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="2 layers of width 64 (the CPU smoke test)")
    parser.add_argument("--pairs", type=int, default=32, help="preference pairs for features and probe")
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--sample-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dpo-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args(argv)
    if args.tiny:  # minutes-sized on 2 CPU cores: what CI runs
        args.pairs, args.dpo_steps, args.eval_prompts = min(args.pairs, 4), min(args.dpo_steps, 3), min(args.eval_prompts, 4)
        args.sample_prompts, args.max_new_tokens, args.dpo_batch, args.max_length = 2, 8, 2, 64

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rbrm.dpo import ConfidenceDPOConfig, ConfidenceDPOTrainer
    from rbrm.evaluation import evaluate, parse_prompt_set
    from rbrm.features import examples_to_rows, extract_features, feature_metadata
    from rbrm.formats import load_pairs, load_prompts
    from rbrm.judges import RefusalPatternJudge
    from rbrm.models import resolve_dtype
    from rbrm.rerank import Sample, rerank, score_samples
    from rbrm.reward_model import RewardTrainConfig, train_reward_model
    from rbrm.sampling import DecodingConfig, generate_responses

    device, start_all = args.device, time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="rbrm-gpu-check-"))
    dtype = resolve_dtype("auto", device, inference=True)
    lines: list[str] = []

    def report(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    report(f"device {device} ({torch.cuda.get_device_name(0) if device.startswith('cuda') else 'CPU'}), "
           f"dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")
    peak = matmul_peak(device, torch.bfloat16)
    report(f"[peak] bf16 matmul {peak / 1e12:.2f} TFLOP/s")

    (model, tokenizer), seconds = timed(device, build_model, args.model_dir, args.tiny, dtype, device)
    layers = list(range(1, model.config.num_hidden_layers + 1))
    report(f"[model] {type(model).__name__}, {n_params(model) / 1e6:.1f}M parameters, {len(layers)} layers, "
           f"{seconds:.1f} s")

    # ---------------------------------------------------------------- features: ours vs naive, and precision
    pairs = load_pairs(PAIRS, limit=args.pairs)
    rows, _, pair_index = examples_to_rows(pairs, [])
    extract_features(model, tokenizer, rows[:4], layers, progress=False)  # warm-up
    naive_features(model, tokenizer, rows[:2])
    stats: dict = {}
    features, ours_s = timed(device, extract_features, model, tokenizer, rows, layers, "last", 8192, progress=False,
                             stats=stats)
    _, naive_s = timed(device, naive_features, model, tokenizer, rows)
    achieved = 2 * n_params(model) * stats["forward_tokens"] / ours_s
    report(f"[features] {len(rows)} responses: ours {ours_s:.2f} s, naive {naive_s:.2f} s")
    report(f"ratio_features={naive_s / ours_s:.2f}")
    report(f"fraction_peak_features={achieved / peak:.4f}")

    reference = type(model)(model.config).float().eval()
    reference.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    cpu_fp32 = extract_features(reference, tokenizer, rows[:8], layers, progress=False)
    device_feats = features[:8]
    cosine = torch.nn.functional.cosine_similarity(device_feats, cpu_fp32, dim=-1).min().item()
    report(f"[precision] {str(dtype).removeprefix('torch.')} on {device} vs fp32 on CPU: min cosine {cosine:.5f} "
           f"over 8 rows x {len(layers)} layers (goal >= {FEATURE_COSINE_MIN})")
    del reference

    # ---------------------------------------------------------------- probe
    config = feature_metadata(model, tokenizer, layers, "last")
    (probe, metrics), seconds = timed("cpu", train_reward_model, features, pair_index, None,
                                      RewardTrainConfig(epochs=50, patience=10), config=config, progress=False)
    report(f"[probe] {len(pair_index)} pairs, {seconds:.1f} s, val pair accuracy "
           f"{metrics.get('val_pair_accuracy', float('nan')):.3f}")

    # ---------------------------------------------------------------- sampling: batched vs one prompt at a time
    prompts = load_prompts(SAMPLING_PROMPTS, limit=args.sample_prompts)
    settings = DecodingConfig(max_new_tokens=args.max_new_tokens)
    generate_responses(model, tokenizer, prompts[:1], 2, settings, progress=False)  # warm-up
    batched, batched_s = timed(device, generate_responses, model, tokenizer, prompts, 4, settings,
                               batch_prompts=len(prompts), progress=False)
    _, single_s = timed(device, generate_responses, model, tokenizer, prompts, 4, settings, batch_prompts=1,
                        max_sequences=4, progress=False)
    report(f"[sampling] {len(prompts)} prompts x 4: batched {batched_s:.2f} s, one prompt at a time {single_s:.2f} s")
    report(f"ratio_sampling={single_s / batched_s:.2f}")

    # ---------------------------------------------------------------- re-ranking
    samples = [Sample(r["prompt_id"], r["prompt"], r["response"], r["sample_index"], i) for i, r in enumerate(batched)]
    scores, seconds = timed(device, score_samples, model, tokenizer, probe.to(device), samples, progress=False)
    for s, score in zip(samples, scores):
        s.score = score
    result = rerank(samples)
    report(f"[rerank] {len(samples)} samples scored in {seconds:.2f} s, {len(result.pairs)} pairs")
    probe = probe.cpu()

    # ---------------------------------------------------------------- DPO: confidence (online probe) vs plain TRL
    from rbrm.render import render

    data = Dataset.from_list([dict(zip(("prompt", "chosen", "rejected"), (*render(tokenizer, p.prompt, p.chosen),
                                                                         render(tokenizer, p.prompt, p.rejected)[1])))
                              for p in pairs])
    use_cpu = not device.startswith("cuda")
    common = dict(per_device_train_batch_size=args.dpo_batch, max_length=args.max_length, max_steps=args.dpo_steps, learning_rate=1e-6,
                  beta=0.1, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                  gradient_checkpointing=False, dataloader_num_workers=0, use_cpu=use_cpu,
                  bf16=not use_cpu)
    times: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    for kind in ("trl", "ours"):
        policy = type(model)(model.config).to(torch.float32)
        policy.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        policy.to(device)
        ref = type(model)(model.config).to(torch.float32)
        ref.load_state_dict(policy.state_dict())
        ref.to(device).eval().requires_grad_(False)
        stamps: list[float] = []

        if kind == "ours":
            trainer = ConfidenceDPOTrainer(policy, ref_model=ref, train_dataset=data, processing_class=tokenizer,
                                           args=ConfidenceDPOConfig(output_dir=str(out / kind), confidence="online",
                                                                    **common),
                                           reward_model=probe, callbacks=[StepStamps(device, stamps)])
        else:
            trainer = DPOTrainer(policy, ref_model=ref, train_dataset=data, processing_class=tokenizer,
                                 args=DPOConfig(output_dir=str(out / kind), **common),
                                 callbacks=[StepStamps(device, stamps)])
        trainer.train()
        times[kind] = [b - a for a, b in zip(stamps, stamps[1:])] or [float("nan")]  # first step is warm-up
        tokens[kind] = getattr(trainer, "forward_tokens", 0)
        del trainer, policy, ref
    step = {k: statistics.median(v) for k, v in times.items()}
    report(f"[dpo] {args.dpo_steps} steps x {args.dpo_batch} pairs each: TRL {step['trl']:.3f} s/step, ours {step['ours']:.3f} "
           "s/step (medians after the first step; same pairs, batch, max_length and seed)")
    report(f"ratio_dpo={step['ours'] / step['trl']:.3f}")
    # policy forward+backward ~ 6 N per token, reference forward 2 N: forward_tokens counts both forwards
    dpo_flops = 4 * n_params(model) * tokens["ours"] / (step["ours"] * args.dpo_steps)
    report(f"fraction_peak_dpo={dpo_flops / peak:.4f}")

    # ---------------------------------------------------------------- evaluation
    sets = [parse_prompt_set(f"advbench={EVAL_PROMPTS}:limit={args.eval_prompts}")]
    summaries, seconds = timed(device, evaluate, model, tokenizer, sets, RefusalPatternJudge(), str(out / "eval"),
                               DecodingConfig.greedy(args.max_new_tokens), batch_prompts=32, progress=False,
                               plot=False)
    report(f"[eval] {summaries['advbench']['n']} prompts in {seconds:.1f} s (keyword judge; random weights make the "
           "rates meaningless)")

    ok = cosine >= FEATURE_COSINE_MIN
    report(f"[summary] all stages ran in {time.perf_counter() - start_all:.0f} s; precision "
           f"{'ok' if ok else 'OUT OF TOLERANCE'}; outputs in {out}")
    (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
