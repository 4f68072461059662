"""`rbrm rerank`: score samples with the hybrid reward and write ranking, chosen/rejected and DPO pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation import ranking_quality
from ..judges import get_judge
from ..models import DEFAULT_MODEL
from ..rerank import format_summary, pair_rows, rank_rows, rerank_file, write_rerank_outputs


@dataclass
class RerankConfig:
    samples: str = field(metadata={"help": "samples .jsonl (from `rbrm sample`, or the paper's idx/input/output)"})
    reward: str = field(metadata={"help": "hybrid reward model directory (from `rbrm probe train`)"})
    out: str = field(metadata={"help": "folder for rank/chosen/rejected/pairs .jsonl and summary.json",
                               "aliases": ["--out-dir", "--out_dir"]})  # the 0.4 spelling still works
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "the policy that produced the samples"})
    top_k: int = field(default=1, metadata={"help": "pairs per prompt: i-th best vs i-th worst, i < k"})
    alpha: float | None = field(default=None, metadata={
        "help": "confidence = sigmoid(alpha x score gap) (default: the probe's calibrated scale)"})
    min_gap: float = field(default=0.0, metadata={"help": "drop pairs whose score gap is <= this"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on CUDA; on a CPU the faster of fp32 and bf16 there, measured once per machine; "
                "RBRM_CPU_PRECISION=fp32|bf16 forces it), float32, bfloat16"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per forward batch"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N sample rows"})
    judge: str | None = field(default=None, metadata={
        "help": "also judge the samples (states, minilm, refusal, or a guard model with --judge-model) and report how "
                "well the reward ranks them: AUC, and how often the chosen answer is judged safer"})
    judge_model: str | None = field(default=None, metadata={"help": "local guard-model folder for --judge"})


def run_rerank(config: RerankConfig) -> None:
    result = rerank_file(config.model, config.reward, config.samples, config.top_k, config.alpha, config.min_gap,
                         config.dtype, config.device, config.batch_tokens, config.limit)
    if config.judge:
        result.summary["ranking_quality"] = ranking_quality(rank_rows(result), pair_rows(result, result.summary[
            "alpha"]), get_judge(config.judge, config.judge_model))
    write_rerank_outputs(result, config.out, result.summary["alpha"])
    print(format_summary(result.summary))
    print(f"wrote {config.out}/{{rank,chosen,rejected,pairs}}.jsonl and summary.json")
