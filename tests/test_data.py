"""The data layer: every bundled file and input layout parses, and every bad row is reported precisely."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from rbrm.errors import DataError
from rbrm.files import append_jsonl, iter_records, read_jsonl, write_json, write_jsonl
from rbrm.formats import (
    detect_format,
    load_examples,
    load_labelled,
    load_pairs,
    load_prompts,
    load_scored_samples,
    parse_hh_transcript,
)

DATA = Path(__file__).resolve().parents[1] / "data"
WRAP = "Respond to this input:\n\n{}\n\noutput:output :"


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# ---------------------------------------------------------------- formats, from small files

def test_pku_pairs_and_labels(tmp_path):
    rows = [
        {"prompt": "p1", "response_0": "a", "response_1": "b", "safer_response_id": 1,
         "is_response_0_safe": False, "is_response_1_safe": True, "id": 7},
        {"prompt": "p2", "response_0": "c", "response_1": "d", "safer_response_id": 0,
         "is_response_0_safe": None, "is_response_1_safe": None},
    ]
    pairs, labelled = load_examples(jsonl(tmp_path / "pku.jsonl", rows))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p1", "b", "a"), ("p2", "c", "d")]
    assert pairs[0].meta["id"] == 7 and pairs[0].source.endswith("pku.jsonl:1")
    assert [(x.response, x.safe) for x in labelled] == [("a", False), ("b", True)]
    with pytest.raises(DataError, match="no safety-labelled"):
        load_labelled(jsonl(tmp_path / "nolabels.jsonl", rows[1:]))


def test_pku_dialogue_history_gives_a_conversation(tmp_path):
    base = {"response_0": "a", "response_1": "b", "safer_response_id": 0,
            "is_response_0_safe": None, "is_response_1_safe": None}
    rows = [{**base, "prompt": "again?", "dialogue_history": hh("hi", "hello", "again?", "")},
            {**base, "prompt": "once", "dialogue_history": hh("once", "")}]
    pairs = load_pairs(jsonl(tmp_path / "d.jsonl", rows))
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "again?"}]
    assert pairs[1].prompt == "once"


def test_hh_transcripts(tmp_path):
    rows = [{"chosen": hh("q", "good"), "rejected": hh("q", "bad")},
            {"chosen": hh("q1", "a1", "q2", "good"), "rejected": hh("q1", "a1", "q2", "bad")},
            {"chosen": hh("q", "x", "q2", "good"), "rejected": hh("q", "y", "q2", "bad")},  # diverges: skipped
            {"chosen": hh("q", ""), "rejected": hh("q", "bad")}]  # empty response: skipped
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert detect_format(rows[0]) == "hh"
    pairs = load_pairs(path)
    assert len(pairs) == 2
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("q", "good", "bad")
    assert [m["role"] for m in pairs[1].prompt] == ["user", "assistant", "user"]
    assert pairs[1].prompt[-1]["content"] == "q2" and pairs[1].chosen == "good"


def test_parse_hh_transcript():
    text = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\nReally.\n\nHuman: And 3+3?\n\nAssistant:"
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.\nReally."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert parse_hh_transcript(text, drop_empty_last=False)[-1] == {"role": "assistant", "content": ""}
    with pytest.raises(ValueError):
        parse_hh_transcript("no tags at all")


def test_trl_explicit_conversational_and_implicit(tmp_path):
    u = {"role": "user", "content": "q"}
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    assert [(p.prompt, p.chosen) for p in load_pairs(jsonl(tmp_path / "a.jsonl", rows))] == [("q", "good")]
    rows = [{"prompt": [{"role": "system", "content": "s"}, u],
             "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}]}]
    pair = load_pairs(jsonl(tmp_path / "b.jsonl", rows))[0]
    assert pair.prompt[0]["role"] == "system" and (pair.chosen, pair.rejected) == ("good", "bad")
    rows = [{"chosen": [u, {"role": "assistant", "content": "good"}],
             "rejected": [u, {"role": "assistant", "content": "bad"}]}]
    assert detect_format(rows[0]) == "trl"
    pair = load_pairs(jsonl(tmp_path / "c.jsonl", rows))[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("q", "good", "bad")
    rows[0]["rejected"][0] = {"role": "user", "content": "other"}
    with pytest.raises(DataError, match="share"):
        load_pairs(jsonl(tmp_path / "d.jsonl", rows))


def test_paper_samples(tmp_path):
    rows = [{"idx": 0, "input": WRAP.format("p1"), "output": "meh", "score": 0.1},
            {"idx": 3, "input": WRAP.format("p1"), "output": "best", "score": 2.0},
            {"idx": 5, "input": WRAP.format("p1"), "output": "worst", "score": -1.0},
            {"idx": 1, "input": "Respond to this input:\n\np2\n\noutput :", "output": "x", "score": 1.0},
            {"idx": 2, "input": "p2", "output": "y", "score": 1.0},  # equal scores: no pair for p2
            {"idx": 0, "input": "p3", "output": "same", "score": 1.0},
            {"idx": 1, "input": "p3", "output": "same", "score": 2.0}]  # one distinct response: no pair
    path = jsonl(tmp_path / "samples.jsonl", rows)
    samples = load_scored_samples(path)
    assert [s.prompt for s in samples] == ["p1"] * 3 + ["p2"] * 2 + ["p3"] * 2
    assert samples[1].index == 3 and samples[1].score == 2.0 and samples[1].prompt_id == "p1"
    pairs, labelled = load_examples(path)
    assert labelled == [] and len(pairs) == 1
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("p1", "best", "worst")
    assert pairs[0].meta["chosen_index"] == 3


def test_own_scored_samples_without_scores(tmp_path):
    rows = [{"prompt": "p", "response": "a"}, {"prompt": "p", "response": "b", "score": 1}]
    samples = load_scored_samples(jsonl(tmp_path / "ours.jsonl", rows))
    assert [(s.index, s.score, s.prompt_id) for s in samples] == [(0, None, "p"), (1, 1.0, "p")]


@pytest.mark.parametrize("field,value,safe", [
    ("label", "SAFE", True), ("label", "unsafe", False), ("label", 1, True), ("label", 0, False),
    ("label", True, True), ("safe", False, False), ("is_safe", True, True)])
def test_labelled_responses(tmp_path, field, value, safe):
    path = jsonl(tmp_path / "lab.jsonl", [{"prompt": "p", "response": "r", field: value}])
    assert [(x.prompt, x.response, x.safe) for x in load_labelled(path)] == [("p", "r", safe)]


# ---------------------------------------------------------------- errors name file, line and field

def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": "r", "label": "safe"}\n\n{"prompt": oops}\n')
    with pytest.raises(DataError) as e:
        load_labelled(path)
    assert "broken.jsonl:3" in str(e.value) and e.value.line == 3


def test_missing_field_and_bad_label(tmp_path):
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "safer_response_id": 0}
    path = jsonl(tmp_path / "pku.jsonl", [row, {k: v for k, v in row.items() if k != "response_1"}])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert (e.value.line, e.value.field) == (2, "response_1")
    assert "pku.jsonl:2" in str(e.value) and "response_1" in str(e.value)

    path = jsonl(tmp_path / "lab.jsonl", [{"prompt": "p", "response": "r", "label": "maybe"}])
    with pytest.raises(DataError, match=r"lab\.jsonl:1: field 'label'.*maybe"):
        load_labelled(path)
    path = jsonl(tmp_path / "lab2.jsonl", [{"prompt": "p", "response": 5, "label": "safe"}])
    with pytest.raises(DataError, match="field 'response'"):
        load_labelled(path)


def test_other_bad_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="unknown extension"):
        list(iter_records(tmp_path / "x.txt"))
    with pytest.raises(DataError, match=r"a\.jsonl:1.*JSON object"):
        list(iter_records(jsonl(tmp_path / "a.jsonl", [[1, 2]])))
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "x"}, {"instruction": 3}]))
    with pytest.raises(DataError, match=r"b\.json element 1: field 'instruction'"):
        load_prompts(tmp_path / "b.json")
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('goal,target\n"multi\nline",t\nshort\n')
    with pytest.raises(DataError, match=r"c\.csv:4: expected 2 csv columns"):
        load_prompts(csv_path)


# ---------------------------------------------------------------- prompts

def test_prompts_from_small_files(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(["a", "b"]))
    assert [(r.id, r.prompt) for r in load_prompts(tmp_path / "s.json")] == [("0", "a"), ("1", "b")]
    rows = [{"qid": 9, "question": "q", "1-category": "O1"}, {"qid": 10, "question": "r", "1-category": ""}]
    recs = load_prompts(jsonl(tmp_path / "q.jsonl", rows))
    assert [(r.id, r.category) for r in recs] == [("9", "O1"), ("10", None)]
    recs = load_prompts(jsonl(tmp_path / "w.jsonl", [{"input": WRAP.format("hi"), "output": "x"}]))
    assert recs[0].prompt == "hi"
    with pytest.raises(DataError, match="field 'label'"):
        load_prompts(tmp_path / "q.jsonl", where={"label": "safe"})


# ---------------------------------------------------------------- the bundled files

def test_bundled_preference_files():
    pairs, labelled = load_examples(DATA / "hh_rlhf_harmless_test" / "derived_pku_format.jsonl")
    assert len(pairs) == 2303 and labelled == []
    assert sum(isinstance(p.prompt, str) for p in pairs) == 658  # single-turn ones stay plain strings
    assert all(isinstance(p.prompt, str) or p.prompt[-1]["role"] == "user" for p in pairs)
    pairs, labelled = load_examples(DATA / "xstest" / "derived_unsafe_prompt_pairs_pku_format.jsonl")
    assert len(pairs) == 520 and len(labelled) == 1040
    assert sum(x.safe for x in labelled) == 520
    assert len(load_pairs(DATA / "hh_rlhf_harmless_test" / "derived_pku_format.jsonl", limit=5)) == 5


def test_bundled_paper_samples():
    path = DATA / "rbrm_paper" / "hybrid-rm-chosen.head64.jsonl"
    samples = load_scored_samples(path)
    assert len(samples) == 64 and samples[0].prompt == "how can i get a fake id?"
    pairs = load_pairs(path)
    assert 0 < len(pairs) <= 16
    assert all(p.meta["chosen_score"] > p.meta["rejected_score"] for p in pairs)


@pytest.mark.parametrize("rel,kwargs,count,first_id,category", [
    ("advbench/harmful_behaviors.csv", {}, 520, "0", None),
    ("harmbench/harmbench_behaviors_text_test.csv", {}, 320, "korean_war_north_defensive",
     "misinformation_disinformation"),
    ("salad_bench/derived_base_questions_available.jsonl", {}, 649, "27", "O3: Socioeconomic Harms"),
    ("refusal_direction/harmful_train.json", {}, 260, "0", None),
    ("xstest/xstest_prompts.csv", {"where": {"label": "safe"}}, 250, "1", "homonyms"),
    ("do_not_answer/malicious_uses.jsonl", {}, 243, "0", None),
    ("rbrm_paper/derived_rbrm_prompts_unique.jsonl", {}, 1592, "0", None),  # one empty prompt skipped
    ("pyrit_refusal/refusal.csv", {"prompt_field": "objective"}, 105, "0", None),
])
def test_bundled_prompt_files(rel, kwargs, count, first_id, category):
    recs = load_prompts(DATA / rel, **kwargs)
    assert len(recs) == count
    assert (recs[0].id, recs[0].category) == (first_id, category)
    assert all(isinstance(r.prompt, str) and r.prompt.strip() for r in recs)


def test_bundled_do_not_answer_and_xstest_unsafe():
    total = sum(len(load_prompts(p)) for p in sorted((DATA / "do_not_answer").glob("*.jsonl")))
    assert total == 939
    assert len(load_prompts(DATA / "xstest" / "xstest_prompts.csv", where={"label": "unsafe"})) == 200


# ---------------------------------------------------------------- writing and reading our own files

def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    write_jsonl(path, [{"a": 1}, {"a": "é"}])
    assert read_jsonl(path) == [{"a": 1}, {"a": "é"}]

    def rows():
        yield {"a": 2}
        raise RuntimeError("stage crashed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert read_jsonl(path) == [{"a": 1}, {"a": "é"}]
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temp file left behind
    write_json(tmp_path / "m.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": [1, 2]}


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    from rbrm.files import atomic_dir

    path = tmp_path / "model"
    with atomic_dir(path) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(path) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("killed while saving")
    assert sorted(p.name for p in path.iterdir()) == ["a.txt"]  # the old folder, untouched
    with atomic_dir(path) as tmp:
        (tmp / "c.txt").write_text("2")
    assert sorted(p.name for p in path.iterdir()) == ["c.txt"]  # replaced whole, no leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind


def test_read_jsonl_truncated_tail_and_append(tmp_path, caplog):
    path = tmp_path / "s.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    with caplog.at_level(logging.WARNING, logger="rbrm.files"):
        assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert "truncated" in caplog.text
    append_jsonl(path, [{"a": 4}])  # the partial line is cut before appending
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    append_jsonl(tmp_path / "new.jsonl", [{"z": 0}])
    assert read_jsonl(tmp_path / "new.jsonl") == [{"z": 0}]
    (tmp_path / "nonl.jsonl").write_text('{"a": 1}')  # complete row, no newline: kept
    append_jsonl(tmp_path / "nonl.jsonl", [{"a": 2}])
    assert read_jsonl(tmp_path / "nonl.jsonl") == [{"a": 1}, {"a": 2}]

    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2"):
        read_jsonl(path)


def test_answer_labels_give_safety_examples_on_harmful_prompts_only(tmp_path):
    rows = [{"prompt": "How do I make a bomb?", "response": "Step 1: get", "unsafe": True, "benign": False},
            {"prompt": "How do I make a bomb?", "response": "I can't help.", "unsafe": False, "benign": False},
            {"prompt": "Write a haiku.", "response": "Waves on sand", "unsafe": False, "benign": True,
             "helpful": True}]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, labelled = load_examples(path)
    assert pairs == [] and [(x.response, x.safe) for x in labelled] == [("Step 1: get", False), ("I can't help.", True)]
    path.write_text(json.dumps({**rows[0], "unsafe": None}) + "\n")
    with pytest.raises(DataError, match=r"labels.jsonl:1.*unsafe.*missing on a harmful prompt"):
        load_examples(path)
    _, bundled = load_examples("data/rbrm_labels/smollm2_dev.jsonl")
    assert len(bundled) == 460 and sum(not x.safe for x in bundled) == 149  # 125 base + 24 RBRM unsafe answers
