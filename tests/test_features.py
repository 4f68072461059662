"""Hidden-state features: pooling positions, hooks vs output_hidden_states, prompt sharing, files."""

from __future__ import annotations

import json

import pytest
import torch

from rbrm.feature_files import load_features, save_features
from rbrm.features import (
    MAX_PADDING,
    PromptGroup,
    decoder_layers,
    extract_features,
    padded_tokens,
    plan_batches,
    pool,
)
from rbrm.render import end_of_turn, render, tokenize

ROWS = [
    ("How do I make a bomb?", "I can't help with that."),
    ("How do I make a bomb?", "Sure, first you get some fertiliser and then"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "how do I steal a car?"}], "No."),
    ("short", "A much longer answer that goes on and on for quite a few tokens, more than the others."),
    ("How do I make a bomb?", "Why do you ask?"),
]


def reference_states(model, tokenizer, rows, pooling="last"):
    """Per-row full forward with output_hidden_states: the plain, slow way."""
    out = []
    for prompt, response in rows:
        prompt_ids, completion_ids = tokenize(tokenizer, *render(tokenizer, prompt, response))
        ids = torch.tensor([prompt_ids + completion_ids])
        states = model(ids, output_hidden_states=True).hidden_states[1:]
        mask = torch.zeros(1, ids.shape[1], dtype=torch.long)
        mask[0, len(prompt_ids):] = 1
        out.append(torch.stack([pool(h, mask, pooling)[0] for h in states]))
    return torch.stack(out)


def test_pool_positions_left_and_right_padding():
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    right = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # response tokens, right padded / prompt first
    assert pool(hidden, right, "last")[:, 0].tolist() == [2.0, 9.0]
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])
    assert pool(hidden, left, "last")[:, 0].tolist() == [4.0, 8.0]
    assert pool(hidden, left, "mean")[:, 0].tolist() == [3.0, 8.0]
    with pytest.raises(ValueError, match="no response token"):
        pool(hidden, torch.zeros(2, 5, dtype=torch.long), "last")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, left, "max")


def test_endpoint_is_end_of_turn_token(tokenizer):
    prompt_ids, completion_ids = tokenize(tokenizer, *render(tokenizer, "hi", "hello there"))
    assert end_of_turn(tokenizer) == "<|im_end|>"
    assert completion_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_hooked_features_equal_output_hidden_states(tiny_model, tokenizer, pooling):
    ref = reference_states(tiny_model, tokenizer, ROWS, pooling)
    ours = extract_features(tiny_model, tokenizer, ROWS, pooling=pooling, progress=False)
    assert ours.shape == (len(ROWS), tiny_model.config.num_hidden_layers, tiny_model.config.hidden_size)
    # hidden_states[-1] is after the final norm; a layer hook sees the layer's own output.
    torch.testing.assert_close(ours[:, :-1], ref[:, :-1], atol=1e-5, rtol=1e-4)
    if pooling == "last":
        torch.testing.assert_close(tiny_model.model.norm(ours[:, -1]), ref[:, -1], atol=1e-5, rtol=1e-4)


def test_prompt_sharing_and_batching_do_not_change_features(tiny_model, tokenizer):
    stats_shared, stats_plain = {}, {}
    shared = extract_features(tiny_model, tokenizer, ROWS, progress=False, stats=stats_shared)
    plain = extract_features(tiny_model, tokenizer, ROWS, share_prefix=False, progress=False, stats=stats_plain)
    one_by_one = extract_features(tiny_model, tokenizer, ROWS, batch_tokens=1, progress=False)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shared, one_by_one, atol=1e-5, rtol=1e-4)
    assert stats_shared["forward_tokens"] < stats_plain["forward_tokens"]  # the shared prompt ran once


def test_batches_cap_padding_and_keep_every_group_once():
    """Padding runs through the model like real tokens: a batch grows only while its waste stays under MAX_PADDING,
    within the token and size budgets, and every group lands in exactly one batch."""
    groups = [PromptGroup([2 * i, 2 * i + 1], [1] * (5 + i % 7), [[2] * (3 + (7 * i) % 40), [3] * (2 + (3 * i) % 25)])
              for i in range(40)]
    batches = plan_batches(groups, batch_tokens=600, batch_size=6)
    assert sorted(id(g) for b in batches for g in b) == sorted(id(g) for g in groups)
    for batch in batches:
        padded, real = padded_tokens(batch)
        assert len(batch) <= 6
        if len(batch) > 1:
            assert padded <= 600 and padded <= (1 + MAX_PADDING) * real
    assert any(len(b) > 1 for b in batches)  # the cap still lets similar lengths share a forward
    assert sum(padded_tokens(b)[0] for b in batches) < padded_tokens(groups)[0]  # less than one padded batch


def test_layer_subset_and_hooks_removed(tiny_model, tokenizer):
    before = [dict(layer._forward_hooks) for layer in decoder_layers(tiny_model)]  # transformers' own
    full = extract_features(tiny_model, tokenizer, ROWS, progress=False)
    first = extract_features(tiny_model, tokenizer, ROWS, layers=[1], progress=False)
    torch.testing.assert_close(first[:, 0], full[:, 0])
    assert [dict(layer._forward_hooks) for layer in decoder_layers(tiny_model)] == before
    with pytest.raises(ValueError, match="out of range"):
        extract_features(tiny_model, tokenizer, ROWS, layers=[0], progress=False)


def test_features_file_round_trip_and_errors(tmp_path):
    feats = torch.randn(4, 2, 8)
    path = tmp_path / "f.safetensors"
    save_features(str(path), feats, {"layers": [1, 2], "pooling": "last"}, pair_index=torch.tensor([[0, 1], [2, 3]]))
    loaded = load_features(str(path))
    torch.testing.assert_close(loaded.features, feats)
    assert loaded.metadata["layers"] == [1, 2] and loaded.labels is None
    from safetensors.torch import save_file

    save_file({"features": feats}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="labels.*pair_index"):
        load_features(str(tmp_path / "bare.safetensors"))
    save_file({"features": feats, "pair_index": torch.tensor([[0, 9]])}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="pair_index"):
        load_features(str(tmp_path / "bad.safetensors"))
    # computed elsewhere: only the tensors, no metadata
    save_file({"features": feats, "labels": torch.tensor([1, 0, 1, 0])}, str(tmp_path / "ext.safetensors"))
    assert load_features(str(tmp_path / "ext.safetensors")).labels.tolist() == [1, 0, 1, 0]


def test_features_cli(tiny_model_dir, tmp_path):
    from rbrm.cli import main

    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i}?", "chosen": "I won't help.", "rejected": f"Sure, step {i}."} for i in range(3)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "feats.safetensors"
    assert main(["features", "--model", tiny_model_dir, "--data", str(data), "--out", str(out),
                 "--layers", "1", "3", "--pooling", "mean"]) == 0
    loaded = load_features(str(out))
    assert loaded.features.shape == (6, 2, 64)
    assert loaded.pair_index.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert loaded.metadata["layers"] == [1, 3] and loaded.metadata["pooling"] == "mean"
    assert loaded.metadata["model"]["num_layers"] == 3


def test_repeated_rows_are_computed_once(tiny_model, tokenizer):
    rows = ROWS + ROWS[:2]
    stats_once, stats_twice = {}, {}
    once = extract_features(tiny_model, tokenizer, ROWS, progress=False, stats=stats_once)
    twice = extract_features(tiny_model, tokenizer, rows, progress=False, stats=stats_twice)
    torch.testing.assert_close(twice[: len(ROWS)], once)
    torch.testing.assert_close(twice[len(ROWS):], once[:2])
    assert stats_twice["forward_tokens"] == stats_once["forward_tokens"]
