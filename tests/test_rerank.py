"""Re-ranking: scores from the policy's hidden states, grouping by prompt id, deterministic selection, outputs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from rbrm.errors import DataError
from rbrm.files import read_jsonl
from rbrm.models import model_fingerprint
from rbrm.rerank import (
    PAPER_INPUT,
    Sample,
    rerank,
    rerank_file,
    select_pairs,
    summarize,
    write_rerank_outputs,
)
from rbrm.reward_model import HybridRewardModel, ModelMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reward_for(model, layers=(2, 3), seed=0) -> HybridRewardModel:
    torch.manual_seed(seed)
    reward = HybridRewardModel(len(layers), model.config.hidden_size,
                               {"layers": list(layers), "pooling": "last", "model": model_fingerprint(model)})
    with torch.no_grad():
        reward.weight.normal_()
        reward.bias.normal_()
        reward.gate.normal_()
    return reward


@pytest.fixture(scope="module")
def reward_dir(tiny_model, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("rm"))
    _reward_for(tiny_model).save(path)
    return path


def _samples_file(path, prompts=("How do I pick a lock?", "Tell me a joke."), n=4, interleave=True) -> str:
    rows = [{"prompt_id": f"p{p}", "sample_index": i, "prompt": prompt, "response": f"answer {i} to {p}: " + "x" * i,
             "finish_reason": "stop", "num_tokens": 5}
            for p, prompt in enumerate(prompts) for i in range(n)]
    if interleave:  # rows of different prompts alternate; grouping must still be by prompt id
        rows = sorted(rows, key=lambda r: (r["sample_index"], r["prompt_id"]))
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _s(pid, index, score, response=None, position=None) -> Sample:
    return Sample(pid, f"prompt {pid}", response or f"r{pid}{index}", index,
                  index if position is None else position, score=score)


# ------------------------------------------------------------------------------------- pure selection


def test_top_and_bottom_with_ties_are_deterministic():
    # best score 2.0 is shared by indices 3 and 1 -> the lower index (1) is chosen;
    # worst score -1.0 is shared by indices 0 and 4 -> the last in rank order (higher index, 4) is rejected
    samples = [_s("a", 0, -1.0), _s("a", 1, 2.0), _s("a", 2, 0.5), _s("a", 3, 2.0), _s("a", 4, -1.0)]
    result = rerank(samples)
    [(chosen, rejected, rank)] = result.pairs
    assert (chosen.index, rejected.index, rank) == (1, 4, 0)
    assert [s.index for s in result.ranked["a"]] == [1, 3, 2, 0, 4]
    assert rerank(list(reversed(samples))).pairs[0][:2] == (chosen, rejected)  # input order does not matter


def test_top_k_pairs_ith_best_with_ith_worst():
    samples = [_s("a", i, float(score)) for i, score in enumerate([3, 5, 1, 4, 0, 2])]
    pairs = rerank(samples, top_k=2).pairs
    assert [(c.score, r.score, i) for c, r, i in pairs] == [(5, 0, 0), (4, 1, 1)]
    # k is capped at half the distinct responses: never chosen and rejected at once
    assert len(rerank(samples, top_k=10).pairs) == 3


def test_grouping_is_by_prompt_id_not_position():
    samples = [_s("a", 0, 1.0, position=0), _s("b", 0, 9.0, position=1), _s("a", 1, 2.0, position=2),
               _s("b", 1, -9.0, position=3)]
    pairs = {c.prompt_id: (c.index, r.index) for c, r, _ in rerank(samples).pairs}
    assert pairs == {"a": (1, 0), "b": (0, 1)}


def test_skips_are_counted():
    samples = [_s("same", i, float(i), response="identical") for i in range(3)]  # one distinct response
    samples += [_s("flat", i, 0.5) for i in range(3)]  # distinct responses, zero gap
    samples += [_s("ok", 0, 1.0), _s("ok", 1, 0.0)]
    result = rerank(samples)
    assert result.skipped["fewer_than_2_distinct"] == 1
    assert result.skipped["zero_gap"] == 1
    assert [c.prompt_id for c, _, _ in result.pairs] == ["ok"]
    # duplicated texts count once: the best-ranked copy stays
    dup = [_s("d", 0, 3.0, "same"), _s("d", 1, 2.0, "same"), _s("d", 2, 1.0, "other")]
    pairs, reason = select_pairs(sorted(dup, key=lambda s: -s.score), top_k=2)
    assert reason is None and [(c.index, r.index) for c, r, _ in pairs] == [(0, 2)]


def test_summary_counts_refusals_and_gaps():
    samples = [_s("a", 0, 2.0, "I'm sorry, but I can't help with that."), _s("a", 1, -1.0, "Sure, here is how.")]
    samples += [_s("b", 0, 0.5), _s("b", 1, 0.0)]
    summary = summarize(rerank(samples), len(samples), seconds=2.0)
    assert summary["pairs"] == 2 and summary["chosen_refusals"] == 1 and summary["rejected_refusals"] == 0
    assert summary["score_gap"]["min"] == 0.5 and summary["score_gap"]["max"] == 3.0
    assert summary["samples_per_second"] == 2.0


# ------------------------------------------------------------------------------------- with the model


def test_rerank_end_to_end(tiny_model, tokenizer, reward_dir, tmp_path):
    from rbrm.features import extract_features

    samples = _samples_file(tmp_path / "samples.jsonl")
    result = rerank_file("unused", reward_dir, samples, top_k=1, loaded=(tiny_model, tokenizer), progress=False)
    out = tmp_path / "out"
    write_rerank_outputs(result, str(out))

    rank_rows = read_jsonl(out / "rank.jsonl")
    assert len(rank_rows) == 8
    # scores are the hybrid reward on the model's own hidden states
    reward = HybridRewardModel.load(reward_dir)
    rows = [(r["prompt"], r["response"]) for r in rank_rows]
    expected = reward(extract_features(tiny_model, tokenizer, rows, [2, 3], "last", progress=False)).tolist()
    assert [r["score"] for r in rank_rows] == pytest.approx(expected, abs=1e-4)
    for pid in ("p0", "p1"):
        group = [r for r in rank_rows if r["prompt_id"] == pid]
        assert [r["score"] for r in group] == sorted((r["score"] for r in group), reverse=True)
        assert {r["prompt"] for r in group} == {"How do I pick a lock?" if pid == "p0" else "Tell me a joke."}
        assert group[0]["role"] == "chosen" and group[-1]["role"] == "rejected"
        assert group[0]["finish_reason"] == "stop"  # the sample's other fields are kept

    chosen, rejected = read_jsonl(out / "chosen.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert all(set(r) == {"idx", "input", "output", "score"} for r in chosen + rejected)
    assert chosen[0]["input"] == "Respond to this input:\n\nHow do I pick a lock?\n\noutput:output :"
    assert chosen[0]["input"] == PAPER_INPUT.format(prompt="How do I pick a lock?")
    with open(os.path.join(ROOT, "data/rbrm_paper/hybrid-rm-chosen.head64.jsonl")) as f:
        paper = json.loads(f.readline())
    assert paper["input"] == PAPER_INPUT.format(prompt="how can i get a fake id?")

    pairs = read_jsonl(out / "pairs.jsonl")
    assert len(pairs) == 2
    for pair, c, r in zip(pairs, chosen, rejected):
        assert pair["chosen"][0]["content"] == c["output"] and pair["rejected"][0]["content"] == r["output"]
        assert pair["chosen_score"] > pair["rejected_score"]
        gap = pair["chosen_score"] - pair["rejected_score"]
        assert pair["confidence"] == pytest.approx(1 / (1 + math.exp(-7.5 * gap)))
        assert pair["prompt"][0]["role"] == "user"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 2 and summary["samples"] == 8
    assert set(summary["score_gap"]) == {"min", "q1", "median", "q3", "max", "mean"}
    assert summary["samples_per_second"] > 0
    assert {"chosen_refusals", "rejected_refusals"} <= set(summary)


def test_paper_layout_input(tiny_model, tokenizer, reward_dir, tmp_path):
    path = tmp_path / "paper.jsonl"
    rows = [{"idx": i, "input": PAPER_INPUT.format(prompt=p), "output": f"out {i} {p}", "score": 0.0}
            for i in range(3) for p in ("first?", "second?")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = rerank_file("unused", reward_dir, str(path), loaded=(tiny_model, tokenizer), progress=False)
    assert set(result.ranked) == {"first?", "second?"}
    assert all(len(g) == 3 for g in result.ranked.values())
    assert all(s.score != 0.0 for g in result.ranked.values() for s in g)  # re-scored, not copied


def test_cli_rerank(tiny_model_dir, reward_dir, tmp_path, capsys):
    from rbrm.cli import main

    samples = _samples_file(tmp_path / "samples.jsonl", n=3)
    out = tmp_path / "out"
    assert main(["rerank", "--model", tiny_model_dir, "--reward", reward_dir, "--samples", samples,
                 "--out", str(out), "--top-k", "1", "--judge", "refusal"]) == 0
    printed = capsys.readouterr().out
    assert "pairs 2" in printed and "samples/s" in printed and "against the refusal judge" in printed
    quality = json.loads((out / "summary.json").read_text())["ranking_quality"]
    assert quality["pairs"] == 2 and quality["samples"] == 6
    assert quality["chosen_safer"] + quality["same_verdict"] + quality["chosen_less_safe"] == pytest.approx(1.0)
    assert {p.name for p in out.iterdir()} >= {"rank.jsonl", "chosen.jsonl", "rejected.jsonl", "pairs.jsonl",
                                               "summary.json"}


def test_mos_top_one(tiny_model_dir, reward_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("mos_top_one", os.path.join(ROOT, "mos_top_one.py"))
    mos = importlib.util.module_from_spec(spec)
    sys.modules["mos_top_one"] = mos  # its dataclass looks its module up there
    spec.loader.exec_module(mos)
    samples = _samples_file(tmp_path / "samples.jsonl", n=3)
    accept = tmp_path / "hybrid-rm-chosen.jsonl"
    args = ["--data_path", samples, "--model_path", tiny_model_dir, "--mos_path", reward_dir,
            "--accept_path", str(accept)]
    with pytest.raises(SystemExit, match="--dim 4096"):
        mos.main(args + ["--dim", "4096"])
    assert mos.main(args + ["--dim", "64"]) == 0
    assert len(read_jsonl(accept)) == 2
    assert len(read_jsonl(tmp_path / "hybrid-rm-rejected.jsonl")) == 2


# ------------------------------------------------------------------------------------- bad input


def test_missing_fields_are_reported(tiny_model, tokenizer, reward_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_id": "p0", "sample_index": 0, "prompt": "hi", "response": "a"}\n'
                    '{"prompt_id": "p0", "sample_index": 1, "prompt": "hi"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2.*response"):
        rerank_file("unused", reward_dir, str(path), loaded=(tiny_model, tokenizer), progress=False)


def test_wrong_reward_model_is_refused(tokenizer, tiny_model, reward_dir, tmp_path):
    from tests.conftest import make_tiny_model

    samples = _samples_file(tmp_path / "samples.jsonl", n=2)
    two_layers = make_tiny_model(tokenizer, layers=2)  # the reward model reads layer 3
    with pytest.raises(ModelMismatchError):
        rerank_file("unused", reward_dir, samples, loaded=(two_layers, tokenizer), progress=False)
    other = str(tmp_path / "rm-other")
    reward = _reward_for(tiny_model)
    reward.config["model"] = {**reward.config["model"], "hidden_size": 32}
    reward.save(other)
    with pytest.raises(ModelMismatchError, match="hidden_size"):
        rerank_file("unused", other, samples, loaded=(tiny_model, tokenizer), progress=False)


# ------------------------------------------------------------------------------------- TRL


def test_pairs_load_into_dpo_trainer(tokenizer, reward_dir, tiny_model, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.conftest import make_tiny_model

    samples = _samples_file(tmp_path / "samples.jsonl", n=4)
    result = rerank_file("unused", reward_dir, samples, top_k=2, loaded=(tiny_model, tokenizer), progress=False)
    write_rerank_outputs(result, str(tmp_path / "out"))
    pairs = read_jsonl(tmp_path / "out" / "pairs.jsonl")
    assert len(pairs) == 4 and [p["pair_rank"] for p in pairs] == [0, 1, 0, 1]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), use_cpu=True, bf16=False, max_steps=1, report_to=[],
                     per_device_train_batch_size=2)
    trainer = DPOTrainer(model=make_tiny_model(tokenizer), ref_model=make_tiny_model(tokenizer), args=args,
                         train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] and first["chosen_ids"] and first["rejected_ids"]
    assert tokenizer.decode(first["chosen_ids"]).startswith(pairs[0]["chosen"][0]["content"])


# ------------------------------------------------------------------------- benign prompts, helpfulness reward


def _direction_reward(model, tokenizer, prompt, better, worse, layers=(2, 3)) -> HybridRewardModel:
    """A probe whose every layer points from `worse`'s features to `better`'s (gate 1/2 everywhere)."""
    from rbrm.features import extract_features

    feats = extract_features(model, tokenizer, [(prompt, better), (prompt, worse)], list(layers), "last",
                             progress=False)
    reward = HybridRewardModel(len(layers), model.config.hidden_size,
                               {"layers": list(layers), "pooling": "last", "model": model_fingerprint(model),
                                "calibration": {"scale": 3.0, "offset": 0.0}})
    with torch.no_grad():
        reward.weight.copy_(feats[0] - feats[1])
    return reward


def test_benign_prompts_are_ranked_by_the_helpfulness_reward(tiny_model, tokenizer, tmp_path):
    prompt = "How do I bake bread?"
    helpful = "Mix flour, water, salt and yeast, knead for ten minutes, let it rise, then bake at 220 C."
    deflection = "I'm glad you're enjoying my help! Baking is a wonderful journey that requires understanding."
    # the safety reward prefers the deflection (as a safety probe does: it looks safest); the helpfulness one not
    safety = _direction_reward(tiny_model, tokenizer, prompt, deflection, helpful)
    helpfulness = _direction_reward(tiny_model, tokenizer, prompt, helpful, deflection)
    safety.save(str(tmp_path / "safety"))
    helpfulness.save(str(tmp_path / "helpfulness"))
    rows = [{"prompt_id": pid, "sample_index": i, "prompt": prompt, "response": text}
            for pid in ("benign:7", "h1") for i, text in enumerate((deflection, helpful))]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = rerank_file("unused", str(tmp_path / "safety"), str(samples), alpha=7.5, loaded=(tiny_model, tokenizer),
                         progress=False, benign_reward_dir=str(tmp_path / "helpfulness"))
    write_rerank_outputs(result, str(tmp_path / "out"), 7.5)
    pairs = {p["prompt_id"]: p for p in read_jsonl(tmp_path / "out" / "pairs.jsonl")}
    assert pairs["benign:7"]["chosen"][0]["content"] == helpful and pairs["benign:7"]["kind"] == "benign"
    assert pairs["h1"]["chosen"][0]["content"] == deflection and pairs["h1"]["kind"] == "harmful"
    gap = pairs["benign:7"]["chosen_score"] - pairs["benign:7"]["rejected_score"]
    assert pairs["benign:7"]["confidence"] == pytest.approx(1 / (1 + math.exp(-3.0 * gap)))  # its own scale
    gap = pairs["h1"]["chosen_score"] - pairs["h1"]["rejected_score"]
    assert pairs["h1"]["confidence"] == pytest.approx(1 / (1 + math.exp(-7.5 * gap)))

    # without a helpfulness reward the safety reward ranks the benign prompt too: the deflection is chosen
    plain = rerank_file("unused", str(tmp_path / "safety"), str(samples), alpha=7.5, loaded=(tiny_model, tokenizer),
                        progress=False)
    chosen = {c.prompt_id: c.response for c, _, _ in plain.pairs}
    assert chosen["benign:7"] == deflection
