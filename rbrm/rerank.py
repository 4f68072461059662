"""Re-rank sampled responses with the hybrid reward on the policy's own hidden states (docs/method.md §3).

Every sample is scored r = RM(h(prompt, response)) with the layers and pooling the reward model was trained
with; a `score` already in the input (the paper's files carry one) is ignored. Samples are grouped by prompt id (never by line position) and ranked best first. Chosen = the top k,
rejected = the bottom k of that ranking, paired rank for rank: (best, worst), (2nd best, 2nd worst), ...

Ties: the ranking order is (score descending, sample index ascending, input position ascending), so among
equal scores the lowest sample index ranks higher; chosen are taken from the front of that order and
rejected from the back, which makes every selection deterministic. Identical response texts count once
(the best-ranked copy stays), so a pair never holds the same text twice.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .errors import ConfigError, DataError
from .features import context_length, extract_features, rendered_lengths
from .files import write_json, write_jsonl
from .flops import ModelShape, forward_flops, probe_flops
from .formats import PreferencePair, load_scored_samples
from .models import load_model
from .refusal import is_refusal
from .render import Prompt, prompt_key, to_messages
from .reward_model import HybridRewardModel

log = logging.getLogger(__name__)

PAPER_INPUT = "Respond to this input:\n\n{prompt}\n\noutput:output :"

# The paper's confidence scale: gamma = sigmoid(alpha x reward gap).
PAPER_ALPHA = 7.5

# Ids of benign pool prompts (the paper's "general" samples) start with this.
BENIGN_PREFIX = "benign:"


def is_benign_id(prompt_id: str) -> bool:
    return str(prompt_id).startswith(BENIGN_PREFIX)


@dataclass
class Sample:
    prompt_id: str
    prompt: Prompt
    response: str
    index: int  # the sample index within its prompt (the paper's `idx`)
    position: int  # order in the input file, the last tie-break
    meta: dict = field(default_factory=dict)
    score: float | None = None
    source: str = ""  # "file:line"


@dataclass
class RerankResult:
    ranked: dict[str, list[Sample]]  # prompt id -> its samples, best first (insertion order = input order)
    pairs: list[tuple[Sample, Sample, int]]  # (chosen, rejected, pair rank 0..k-1)
    skipped: dict[str, int]
    summary: dict = field(default_factory=dict)
    # the helpfulness reward's confidence scale when benign prompts were ranked by it (their pairs' kind: benign)
    benign_alpha: float | None = None


# ----------------------------------------------------------------------------------------- loading


def load_samples(path: str | list[str], limit: int | None = None) -> list[Sample]:
    """Samples from `rbrm sample` output or the paper's (idx, input, output, score) files; several files (a
    prompt's plain and prefilled samples) are read as one."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    rows = []
    for p in paths:  # `limit` rows over all files, read no further than needed
        rows += load_scored_samples(p, limit=None if limit is None else limit - len(rows))
    samples, seen = [], {}
    for position, s in enumerate(rows):
        sample = Sample(s.prompt_id or prompt_key(s.prompt), s.prompt, s.response, s.index, position, dict(s.meta),
                        source=s.source)
        file, line = s.source.rsplit(":", 1)
        key = (sample.prompt_id, sample.index)
        if key in seen:  # e.g. two `rbrm sample` runs appended to one file: ranking would count a sample twice
            raise DataError(file, int(line), "sample_index", f"prompt {sample.prompt_id!r} sample {sample.index} "
                            f"appears twice (first at line {seen[key]}); de-duplicate the file or sample again")
        seen[key] = int(line)
        samples.append(sample)
    return samples


def samples_from(rows) -> list[Sample]:
    """Samples from in-memory rows: `generate_responses`' dicts (prompt, response[, prompt_id, sample_index], the
    rest kept as meta) or (prompt, response) tuples. A prompt's samples are numbered in order when the rows do
    not say."""
    samples, counts = [], {}
    for position, row in enumerate(rows):
        row = dict(row) if isinstance(row, dict) else {"prompt": row[0], "response": row[1]}
        prompt, response = row.pop("prompt"), row.pop("response")
        pid = str(row.pop("prompt_id", None) or prompt_key(prompt))
        index = int(row.pop("sample_index", counts.get(pid, 0)))
        counts[pid] = counts.get(pid, 0) + 1
        samples.append(Sample(pid, prompt, response, index, position, row, source=f"rows[{position}]"))
    return samples


def unusable(model, tokenizer, samples: list[Sample]) -> dict[str, list[Sample]]:
    """Samples that cannot be ranked: empty responses (the probe has nothing to read, yet may score them
    highest) and rows longer than the model's context window (their hidden states are not meaningful)."""
    empty = [s for s in samples if not s.response.strip()]
    limit = context_length(model)
    rest = [s for s in samples if s.response.strip()]
    lengths = rendered_lengths(tokenizer, [(s.prompt, s.response) for s in rest]) if limit else []
    return {"empty_responses": empty, "too_long": [s for s, n in zip(rest, lengths) if n > limit]}


# ----------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def score_samples(model, tokenizer, reward, samples: list[Sample], batch_tokens: int = 8192,
                  chunk_samples: int = 512, progress: bool = True, stats: dict | None = None) -> list[float]:
    """Reward of every sample, in input order.

    Features are computed a chunk of whole prompts at a time (so the prompt's KV cache is still shared) and
    dropped after scoring: all layers' features of a large sample file would not fit in memory.
    """
    reward = reward.eval()
    by_prompt: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(s.prompt_id, []).append(i)
    chunks: list[list[int]] = [[]]
    for rows in by_prompt.values():
        if chunks[-1] and len(chunks[-1]) + len(rows) > chunk_samples:
            chunks.append([])
        chunks[-1].extend(rows)
    scores = [0.0] * len(samples)
    bar = tqdm(total=len(samples), desc="rerank", unit="sample", disable=not progress)
    start = time.perf_counter()
    for chunk in chunks:
        if not chunk:
            continue
        rows = [(samples[i].prompt, samples[i].response) for i in chunk]
        features = extract_features(model, tokenizer, rows, reward.layers, reward.pooling, batch_tokens,
                                    progress=False, stats=stats)
        for i, r in zip(chunk, reward(features.to(reward.weight.device)).tolist()):
            scores[i] = float(r)
        if stats is not None:
            stats["flops"] = stats.get("flops", 0) + probe_flops(reward.num_layers, features.shape[2], len(chunk))
        bar.update(len(chunk))
        bar.set_postfix(samples_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    return scores


# --------------------------------------------------------------------------------------- selection


def rank(samples: list[Sample]) -> list[Sample]:
    """Best first; ties by sample index, then input position (see the module docstring)."""
    return sorted(samples, key=lambda s: (-s.score, s.index, s.position))


def select_pairs(ranked: list[Sample], top_k: int = 1, min_gap: float = 0.0):
    """(pairs [(chosen_i, rejected_i, i)], reason skipped or None) for one prompt's ranked samples.

    chosen_i is the i-th best distinct response and rejected_i the i-th worst; k shrinks to half the
    distinct responses so that no response is both chosen and rejected. Pairs whose gap is <= min_gap are
    dropped; the prompt is skipped when its best pair (best vs worst) already is.
    """
    distinct, seen = [], set()
    for s in ranked:
        if s.response not in seen:
            seen.add(s.response)
            distinct.append(s)
    if len(distinct) < 2:
        return [], "fewer_than_2_distinct"
    k = min(top_k, len(distinct) // 2)
    pairs = [(distinct[i], distinct[-1 - i], i) for i in range(k)]
    kept = [p for p in pairs if p[0].score - p[1].score > min_gap]  # gaps shrink with i: a prefix
    if not kept:
        return [], "zero_gap" if pairs[0][0].score == pairs[0][1].score else "gap_below_min"
    return kept, None


def rerank(samples: list[Sample], top_k: int = 1, min_gap: float = 0.0) -> RerankResult:
    """Group scored samples by prompt id, rank each group, select the pairs."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        if s.score is None or math.isnan(s.score):
            raise ValueError(f"sample {s.index} of prompt {s.prompt_id!r} has no score")
        groups.setdefault(s.prompt_id, []).append(s)
    ranked = {pid: rank(group) for pid, group in groups.items()}
    pairs: list[tuple[Sample, Sample, int]] = []
    skipped = {"fewer_than_2_distinct": 0, "zero_gap": 0, "gap_below_min": 0, "pairs_dropped_small_gap": 0}
    for group in ranked.values():
        selected, reason = select_pairs(group, top_k, min_gap)
        if reason:
            skipped[reason] += 1
            continue
        wanted = min(top_k, len({s.response for s in group}) // 2)
        skipped["pairs_dropped_small_gap"] += wanted - len(selected)
        pairs += selected
    return RerankResult(ranked, pairs, skipped)


def confidence(gap: float, alpha: float = PAPER_ALPHA) -> float:
    """Label confidence sigmoid(alpha x reward gap) (docs/method.md §4, without the floor)."""
    return 1.0 / (1.0 + math.exp(-alpha * gap))


# ------------------------------------------------------------------------------------------ output


def paper_input(prompt: Prompt) -> str:
    """The paper's `input` wrapper; a multi-turn prompt is flattened to "role: content" lines."""
    return PAPER_INPUT.format(prompt=prompt_key(prompt))


def paper_row(s: Sample) -> dict:
    return {"idx": s.index, "input": paper_input(s.prompt), "output": s.response, "score": s.score}


def pair_row(chosen: Sample, rejected: Sample, pair_rank: int, alpha: float, kind: str = "harmful") -> dict:
    """TRL conversational preference row: TRL applies the chat template itself, as `render` does.

    `kind` says which reward ranked it: `harmful` (the safety reward) or `benign` (the helpfulness reward)."""
    gap = chosen.score - rejected.score
    return {"kind": kind, "prompt": to_messages(chosen.prompt),
            "chosen": [{"role": "assistant", "content": chosen.response}],
            "rejected": [{"role": "assistant", "content": rejected.response}],
            "chosen_score": chosen.score, "rejected_score": rejected.score,
            "confidence": confidence(gap, alpha), "prompt_id": chosen.prompt_id,
            "chosen_index": chosen.index, "rejected_index": rejected.index, "pair_rank": pair_rank}


def rank_rows(result: RerankResult) -> list[dict]:
    roles = {}
    for c, r, _ in result.pairs:
        roles[id(c)], roles[id(r)] = "chosen", "rejected"
    rows = []
    for pid, group in result.ranked.items():
        for position, s in enumerate(group):
            rows.append({**s.meta, "prompt_id": pid, "sample_index": s.index, "rank": position, "score": s.score,
                         "role": roles.get(id(s)), "prompt": s.prompt, "response": s.response})
    return rows


def chosen_rows(result: RerankResult) -> list[dict]:
    return [paper_row(c) for c, _, _ in result.pairs]


def rejected_rows(result: RerankResult) -> list[dict]:
    return [paper_row(r) for _, r, _ in result.pairs]


def pair_rows(result: RerankResult, alpha: float = PAPER_ALPHA) -> list[dict]:
    rows = []
    for c, r, i in result.pairs:
        if result.benign_alpha is not None and is_benign_id(c.prompt_id):
            rows.append(pair_row(c, r, i, result.benign_alpha, "benign"))
        else:
            rows.append(pair_row(c, r, i, alpha))
    return rows


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0, 0.25, 0.5, 0.75, 1.0],
                                                                                 dtype=torch.float64)).tolist()
    return {"min": q[0], "q1": q[1], "median": q[2], "q3": q[3], "max": q[4], "mean": sum(values) / len(values)}


def summarize(result: RerankResult, n_samples: int, seconds: float | None = None) -> dict:
    """Pairs, skips, score-gap distribution, refusal counts and throughput (also goes to summary.json)."""
    gaps = [c.score - r.score for c, r, _ in result.pairs]
    summary = {
        "prompts": len(result.ranked), "samples": n_samples, "pairs": len(result.pairs),
        "prompts_with_pairs": len({c.prompt_id for c, _, _ in result.pairs}),
        "skipped": dict(result.skipped), "score_gap": _quantiles(gaps),
        "chosen_refusals": sum(is_refusal(c.response) for c, _, _ in result.pairs),
        "rejected_refusals": sum(is_refusal(r.response) for _, r, _ in result.pairs),
        "chosen_prefilled": sum(bool(c.meta.get("prefill")) for c, _, _ in result.pairs),
        "rejected_prefilled": sum(bool(r.meta.get("prefill")) for _, r, _ in result.pairs),
        "refusal_detector": "rbrm.refusal.is_refusal (keywords)",
    }
    if seconds is not None:
        summary["scoring_seconds"] = seconds
        summary["samples_per_second"] = n_samples / max(seconds, 1e-9)
    return summary


def format_summary(summary: dict) -> str:
    gap = summary["score_gap"]
    lines = [f"pairs {summary['pairs']} from {summary['prompts_with_pairs']}/{summary['prompts']} prompts "
             f"({summary['samples']} samples)",
             "skipped: " + ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()),
             "score gap: " + (", ".join(f"{k} {v:.3f}" for k, v in gap.items()) if gap else "n/a"),
             f"refusals: chosen {summary['chosen_refusals']}/{summary['pairs']}, "
             f"rejected {summary['rejected_refusals']}/{summary['pairs']} ({summary['refusal_detector']})"]
    if summary.get("chosen_prefilled") or summary.get("rejected_prefilled"):
        lines.append(f"prefilled answers: chosen {summary['chosen_prefilled']}/{summary['pairs']}, "
                     f"rejected {summary['rejected_prefilled']}/{summary['pairs']}")
    if "samples_per_second" in summary:
        lines.append(f"re-ranking throughput: {summary['samples_per_second']:.1f} samples/s "
                     f"({summary['scoring_seconds']:.1f} s)")
    rq = summary.get("ranking_quality")
    if rq:
        auc = "n/a" if rq["auc"] is None else f"{rq['auc']:.3f}"
        within = "n/a" if rq.get("within_prompt_auc") is None else f"{rq['within_prompt_auc']:.3f}"
        lines.append(f"against the {rq['judge']} judge: AUC {auc}, within a prompt {within}; "
                     f"chosen judged safer {rq.get('chosen_safer', 0):.0%}, "
                     f"same {rq.get('same_verdict', 0):.0%}, less safe {rq.get('chosen_less_safe', 0):.0%}")
    return "\n".join(lines)


def write_rerank_outputs(result: RerankResult, out_dir: str, alpha: float = PAPER_ALPHA) -> None:
    """rank.jsonl, chosen.jsonl, rejected.jsonl, pairs.jsonl and summary.json in `out_dir` (each atomic)."""
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "rank.jsonl"), rank_rows(result))
    write_jsonl(os.path.join(out_dir, "chosen.jsonl"), chosen_rows(result))
    write_jsonl(os.path.join(out_dir, "rejected.jsonl"), rejected_rows(result))
    write_jsonl(os.path.join(out_dir, "pairs.jsonl"), pair_rows(result, alpha))
    write_json(os.path.join(out_dir, "summary.json"), result.summary)


# --------------------------------------------------------------------------------------- the stage


def preference_pairs(result: RerankResult, alpha: float | None = None) -> list[PreferencePair]:
    """The selected pairs as `PreferencePair`s whose meta holds what `pairs.jsonl` holds (confidence, kind, scores),
    ready for `dpo.preference_dataset`; `alpha` None: the scale the ranking used."""
    alpha = result.summary.get("alpha", PAPER_ALPHA) if alpha is None else alpha
    return [PreferencePair(c.prompt, c.response, r.response, c.source,
                           {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")})
            for (c, r, _), row in zip(result.pairs, pair_rows(result, alpha))]


def rerank_file(model_name: str, reward_dir: str, samples_path: str | list[str], top_k: int = 1, alpha: float | None = None,
                min_gap: float = 0.0, dtype: str = "auto", device: str | None = None, batch_tokens: int = 8192,
                limit: int | None = None, dim: int | None = None, progress: bool = True,
                loaded: tuple | None = None, scorer: Callable | None = None,
                benign_reward_dir: str | None = None) -> RerankResult:
    """Load, check, score, rank and select; `loaded` = (model, tokenizer) skips loading the model.

    alpha None: the confidence column uses the probe's calibrated scale. `scorer` (samples -> (scores, FLOPs))
    replaces the hybrid reward, as online pipelines score with an external reward model. `benign_reward_dir`: a
    helpfulness reward (a hybrid reward trained on answers over deflections) that ranks the benign prompts'
    samples instead, so their chosen answer is the most helpful, not the safest-looking one (a deflection).
    """
    samples = load_samples(samples_path, limit)
    reward = HybridRewardModel.load(reward_dir)
    helpful = HybridRewardModel.load(benign_reward_dir) if benign_reward_dir else None
    model, tokenizer = loaded or load_model(model_name, dtype=dtype, device=device)
    if dim is not None and dim != model.config.hidden_size:
        raise ConfigError(f"--dim {dim} does not match the model's hidden size {model.config.hidden_size}")
    result = rerank_samples(model, tokenizer, reward, samples, top_k, min_gap, alpha=alpha, batch_tokens=batch_tokens,
                            progress=progress, scorer=scorer, helpful=helpful)
    result.summary.update(samples_file=samples_path, reward_model=reward_dir, benign_reward_model=benign_reward_dir)
    return result


def rerank_samples(model, tokenizer, reward: HybridRewardModel, samples: list[Sample], top_k: int = 1,
                   min_gap: float = 0.0, *, alpha: float | None = None, batch_tokens: int = 8192,
                   progress: bool = False, scorer: Callable | None = None,
                   helpful: HybridRewardModel | None = None) -> RerankResult:
    """Check, score, rank and select on a loaded model: `rerank_file` without files (see it for the arguments;
    `helpful` is the loaded helpfulness reward). The summary's file fields are None."""
    alpha = reward.calibration["scale"] if alpha is None else alpha
    reward.check_model(model, tokenizer)
    if helpful is not None:
        helpful.check_model(model, tokenizer)
    dropped = unusable(model, tokenizer, samples)
    for reason, bad in dropped.items():
        if bad:
            where = ", ".join(s.source or f"prompt {s.prompt_id!r} sample {s.index}" for s in bad[:5])
            log.warning("not ranking %d sample(s) (%s): %s%s", len(bad), reason.replace("_", " "), where,
                        " ..." if len(bad) > 5 else "")
    skip = {id(s) for bad in dropped.values() for s in bad}
    usable = [s for s in samples if id(s) not in skip]
    stats: dict = {}
    start = time.perf_counter()
    benign = [s for s in usable if is_benign_id(s.prompt_id)] if helpful is not None else []
    harmful = [s for s in usable if not is_benign_id(s.prompt_id)] if helpful is not None else usable
    if scorer is None:
        scores = score_samples(model, tokenizer, reward, harmful, batch_tokens, progress=progress, stats=stats)
    else:
        scores, stats["flops"] = scorer(harmful)
    if benign:
        scores += score_samples(model, tokenizer, helpful, benign, batch_tokens, progress=progress, stats=stats)
    seconds = time.perf_counter() - start
    for s, score in zip(harmful + benign, scores):
        s.score = score
    result = rerank(usable, top_k, min_gap)
    if helpful is not None:
        result.benign_alpha = helpful.calibration["scale"]
    result.skipped.update({reason: len(bad) for reason, bad in dropped.items()})
    result.summary = summarize(result, len(samples), seconds)
    result.summary.update(forward_tokens=stats.get("forward_tokens"), flops=stats.get("flops"), top_k=top_k,
                          alpha=alpha, min_gap=min_gap, samples_file=None, reward_model=None,
                          layers=reward.layers, pooling=reward.pooling, benign_reward_model=None,
                          benign_alpha=result.benign_alpha,
                          scorer=getattr(scorer, "name", "external") if scorer else "hybrid reward")
    return result


class ClassifierReward:
    """A local sequence-classification reward model (one logit: higher = better) as a scorer for `rerank_file`.
    The (prompt, response) pair is rendered with the classifier's own chat template, or as plain text."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 8):
        self.name = f"classifier {os.path.basename(os.path.normpath(path))}"
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has one output (num_labels 1), this one has "
                             f"{self.model.config.num_labels}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.device = batch_size, device

    def text(self, sample: Sample) -> str:
        messages = [*to_messages(sample.prompt), {"role": "assistant", "content": sample.response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)

    @torch.inference_mode()
    def __call__(self, samples: list[Sample]) -> tuple[list[float], int]:
        scores, lengths = [], []
        for start in range(0, len(samples), self.batch_size):
            batch = self.tokenizer([self.text(s) for s in samples[start:start + self.batch_size]], padding=True,
                                   truncation=True, return_tensors="pt").to(self.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
            lengths += batch["attention_mask"].sum(1).tolist()
        return scores, forward_flops(ModelShape.of(self.model), lengths, lm_head=False)
