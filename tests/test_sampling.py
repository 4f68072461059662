"""Sampling: batched, seeded per call, resumable after a kill, and strict about its settings."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from rbrm import sampling
from rbrm.errors import ConfigError
from rbrm.files import read_jsonl
from rbrm.formats import PromptRecord
from rbrm.sampling import (
    DecodingConfig,
    SamplingSettingsError,
    TopKSampler,
    generate_responses,
    plan_calls,
    split_generated,
    stop_token_ids,
)
from tests.conftest import make_tiny_model

SETTINGS = DecodingConfig(max_new_tokens=5)


def _prompts(k: int = 5) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", f"How do I do thing {i}?" + " really" * i, category="cat" if i % 2 else None)
            for i in range(k)]


def _run(model, tokenizer, out=None, seed=0, settings=SETTINGS, **kw):
    kw.setdefault("n", 3)
    kw.setdefault("batch_prompts", 2)
    return generate_responses(model, tokenizer, _prompts(), settings=settings, out_path=out, seed=seed,
                              progress=False, **kw)


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, model, calls: int) -> list[int]:
    """Make `model.generate` raise once it has run `calls` times, as a kill between batches would."""
    real = model.generate
    count = [0]

    def generate(*args, **kwargs):
        if count[0] >= calls:
            raise _Killed
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return count


def test_plan_calls_respects_caps_and_covers_everything():
    calls = plan_calls(5, 8, batch_prompts=2, max_sequences=12)
    assert all(len({p for p, _ in c}) <= 2 and sum(len(r) for _, r in c) <= 12 for c in calls)
    covered = sorted((p, i) for c in calls for p, r in c for i in r)
    assert covered == [(p, i) for p in range(5) for i in range(8)]
    # N larger than the cap: one prompt is split over calls
    assert [[(p, (r.start, r.stop)) for p, r in c] for c in plan_calls(1, 5, 4, 2)] == [
        [(0, (0, 2))], [(0, (2, 4))], [(0, (4, 5))]]


def test_rows_have_the_documented_fields(tiny_model, tokenizer):
    rows = _run(tiny_model, tokenizer)
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(f"p{i}", j) for i in range(5) for j in range(3)]
    for r in rows:
        assert {"prompt_id", "sample_index", "prompt", "response", "finish_reason", "num_tokens"} <= set(r)
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= r["num_tokens"] <= 5
        assert (r.get("category") == "cat") == (int(r["prompt_id"][1:]) % 2 == 1)


def test_same_seed_same_output(tiny_model, tokenizer):
    a = _run(tiny_model, tokenizer, seed=3)
    b = _run(tiny_model, tokenizer, seed=3)
    assert a == b
    assert a != _run(tiny_model, tokenizer, seed=4)
    assert len({r["response"] for r in a}) > 1  # samples of one prompt differ


def test_seed_does_not_leak_into_global_rng(tiny_model, tokenizer):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _run(tiny_model, tokenizer, n=1)
    assert torch.equal(torch.rand(3), expected)


def test_resume_after_kill_equals_uninterrupted(tiny_model, tokenizer, tmp_path, monkeypatch):
    full = tmp_path / "full.jsonl"
    expected = _run(tiny_model, tokenizer, out=str(full))
    assert read_jsonl(full) == expected

    out = tmp_path / "resumed.jsonl"
    _kill_after(monkeypatch, tiny_model, calls=1)
    with pytest.raises(_Killed):
        _run(tiny_model, tokenizer, out=str(out))
    assert len(read_jsonl(out)) == 2 * 3  # the first call: 2 prompts x 3 samples
    with open(out, "a") as f:  # a writer killed mid-line leaves a partial row behind
        f.write('{"prompt_id": "p2", "sample_ind')
    monkeypatch.undo()

    count = _kill_after(monkeypatch, tiny_model, calls=99)
    resumed = _run(tiny_model, tokenizer, out=str(out))
    assert count[0] == 2  # only the two missing calls ran
    assert resumed == expected
    rows = read_jsonl(out)
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 15  # no duplicates, no gaps
    assert sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"])) == expected

    count[0] = 0
    assert _run(tiny_model, tokenizer, out=str(out)) == expected  # complete: nothing to do
    assert count[0] == 0


def test_partially_written_call_is_completed_identically(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "s.jsonl"
    expected = _run(tiny_model, tokenizer, out=str(out))
    rows = read_jsonl(out)
    with open(out, "w") as f:  # lose the last 4 rows (part of the last two calls)
        f.writelines(json.dumps(r) + "\n" for r in rows[:-4])
    assert _run(tiny_model, tokenizer, out=str(out)) == expected


def test_other_settings_are_refused(tiny_model, tokenizer, tmp_path):
    out = str(tmp_path / "s.jsonl")
    _run(tiny_model, tokenizer, out=out, n=1)
    assert os.path.exists(out + ".meta.json")
    with pytest.raises(SamplingSettingsError, match="temperature"):
        _run(tiny_model, tokenizer, out=out, n=1, settings=DecodingConfig(temperature=0.7, max_new_tokens=5))
    with pytest.raises(SamplingSettingsError, match="seed"):
        _run(tiny_model, tokenizer, out=out, n=1, seed=9)
    with pytest.raises(SamplingSettingsError, match="'n'|n:"):
        _run(tiny_model, tokenizer, out=out, n=2)


def test_a_prefilled_answer_is_the_opening_continued_numbered_after_the_plain_samples(tiny_model, tokenizer, tmp_path):
    """A refusal opening is forced, then continued by the model: the generated tokens follow the prefill, and
    the rows resume, clash with no plain sample and refuse another opening."""
    opening = "I'm sorry, but I can't"
    out = str(tmp_path / "prefilled.jsonl")
    rows = _run(tiny_model, tokenizer, out=out, n=1, prefill=opening, first_index=3)
    assert [r["sample_index"] for r in rows] == [3] * 5
    assert all(r["response"].startswith(opening) and r["prefill"] == opening for r in rows)
    # the continuation is what the model says after the opening, not after the bare prompt
    plain = _run(tiny_model, tokenizer, n=1, settings=DecodingConfig.greedy(max_new_tokens=5))
    forced = _run(tiny_model, tokenizer, n=1, settings=DecodingConfig.greedy(max_new_tokens=5), prefill=opening)
    next_token = [tiny_model(**tokenizer(sampling.render_prompt(tokenizer, p.prompt) + opening, return_tensors="pt",
                                         add_special_tokens=False)).logits[0, -1].argmax().item() for p in _prompts()]
    first = [tokenizer(f["response"][len(opening):], add_special_tokens=False)["input_ids"][:1] for f in forced]
    assert all(f["response"].startswith(opening) for f in forced) and forced != plain
    assert sum(f == [t] for f, t in zip(first, next_token)) >= 4  # (re-tokenizing a piece may merge a token)
    assert _run(tiny_model, tokenizer, out=out, n=1, prefill=opening, first_index=3) == rows  # resumed, not redone
    with pytest.raises(SamplingSettingsError, match="prefill"):
        _run(tiny_model, tokenizer, out=out, n=1, prefill="I won't", first_index=3)


def test_other_model_is_refused(tokenizer, tiny_model, tmp_path):
    out = str(tmp_path / "s.jsonl")
    _run(tiny_model, tokenizer, out=out, n=1)
    with pytest.raises(SamplingSettingsError, match="model"):
        _run(make_tiny_model(tokenizer, seed=1), tokenizer, out=out, n=1)


def test_file_without_sidecar_is_refused(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "s.jsonl"
    out.write_text('{"prompt_id": "p0", "sample_index": 0, "prompt": "x", "response": "y"}\n')
    with pytest.raises(SamplingSettingsError, match="meta.json"):
        _run(tiny_model, tokenizer, out=str(out), n=1)


def test_changed_prompts_are_refused(tiny_model, tokenizer, tmp_path):
    out = str(tmp_path / "s.jsonl")
    _run(tiny_model, tokenizer, out=out, n=1)
    other = [PromptRecord("p0", "a different prompt")]
    with pytest.raises(SamplingSettingsError, match="prompts changed"):
        generate_responses(tiny_model, tokenizer, other, n=1, settings=SETTINGS, out_path=out, batch_prompts=2,
                           progress=False)


def test_greedy(tiny_model, tokenizer):
    greedy = DecodingConfig.greedy(max_new_tokens=5)
    a = generate_responses(tiny_model, tokenizer, _prompts(3), n=1, settings=greedy, seed=1, progress=False)
    b = generate_responses(tiny_model, tokenizer, _prompts(3), n=1, settings=greedy, seed=2, progress=False)
    assert a == b
    with pytest.raises(ValueError, match="greedy"):
        generate_responses(tiny_model, tokenizer, _prompts(3), n=2, settings=greedy, progress=False)


def test_a_frozen_head_gets_a_contiguous_input_and_the_same_answers(tokenizer, monkeypatch):
    """A frozen bf16 head fed the strided last-position slice takes PyTorch's slow batched matmul; the backend
    hands it a contiguous copy instead, which changes no token, and leaves no hook behind."""
    model = make_tiny_model(tokenizer).requires_grad_(False)
    head, seen = model.get_output_embeddings(), []
    # a forward hook sees the arguments the forward got, after every pre-hook (the fix's included)
    spy = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    fixed = generate_responses(model, tokenizer, _prompts(3), n=2, settings=SETTINGS, seed=3, progress=False)
    assert len(seen) > 1 and all(seen)
    assert not head._forward_pre_hooks
    seen.clear()
    monkeypatch.setattr(sampling, "contiguous_head_input", lambda _model: contextlib.nullcontext())
    plain = generate_responses(model, tokenizer, _prompts(3), n=2, settings=SETTINGS, seed=3, progress=False)
    spy.remove()
    assert not seen[0]  # without it the head sees the prompt's strided last-position slice
    assert fixed == plain


def test_duplicate_prompt_ids_are_refused(tiny_model, tokenizer):
    prompts = [PromptRecord("a", "x"), PromptRecord("a", "y")]
    with pytest.raises(ValueError, match="unique"):
        generate_responses(tiny_model, tokenizer, prompts, n=1, settings=SETTINGS, progress=False)


def test_split_generated_cuts_at_first_stop(tokenizer):
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop in stop_token_ids(tokenizer)
    hello = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert split_generated(hello + [stop, stop, stop], {stop}, tokenizer) == ("Hello there", "stop", len(hello) + 1)
    assert split_generated(hello, {stop}, tokenizer) == ("Hello there", "length", len(hello))


def test_cli_sample_and_resume(tiny_model_dir, tmp_path, capsys):
    from rbrm.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "samples.jsonl"
    argv = ["sample", "--model", tiny_model_dir, "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "4",
            "--batch-prompts", "2", "--out", str(out)]
    assert main(argv) == 0
    first = read_jsonl(out)
    assert len(first) == 6 and "6 responses" in capsys.readouterr().out
    assert main(argv) == 0  # complete already: same file
    assert read_jsonl(out) == first
    assert main(argv[:-2] + ["--temperature", "0.5", "--out", str(out)]) == 2  # SamplingSettingsError, as a message
    assert "was generated with other settings" in capsys.readouterr().err


def test_vllm_engine_fails_clearly_without_vllm(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    from rbrm.commands.sample import SampleConfig, run_sample

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    config = SampleConfig(prompts=str(prompts), out=str(tmp_path / "o.jsonl"), model=tiny_model_dir, engine="vllm")
    with pytest.raises(ConfigError, match="vllm"):
        run_sample(config)


def test_topk_sampler_gives_the_libraries_probabilities():
    """The fused sampler's candidate probabilities equal transformers' temperature → top-k → top-p chain."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(16, 500) * 3
    for temperature, top_k, top_p in ((1.4, 8, 0.95), (0.7, 50, 0.5), (1.0, 0, 0.9), (2.0, 3, 1.0)):
        expected = scores.clone()
        for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                       TopPLogitsWarper(top_p)):
            expected = warper(None, expected) if warper is not None else expected
        expected = expected.softmax(-1)
        probs, indices = TopKSampler(temperature, top_k, top_p).probabilities(scores)
        ours = torch.zeros_like(expected).scatter_(-1, indices, probs)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
        assert int((ours > 0).sum(-1).min()) >= 1


def test_topk_sampler_draws_one_allowed_token_with_the_right_frequencies():
    sampler = TopKSampler(1.0, 3, 1.0)
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    out = sampler(None, scores)
    assert torch.equal((out == 0).sum(-1), torch.ones(20000, dtype=torch.long))
    counts = torch.bincount(out.argmax(-1), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="top_p"):
        TopKSampler(1.0, 3, 0.0)
