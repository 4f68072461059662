"""`rbrm audit`: the blind stratified sample, resume, import, the prediction-powered estimate, and a real terminal."""

from __future__ import annotations

import io
import json
import math
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rbrm.cli import main
from rbrm.commands.audit import key_reader, label_session
from rbrm.errors import AuditError, DataError
from rbrm.evaluation.audit import (
    Audit,
    audit_notes,
    audit_summary,
    audit_table,
    draw_sample,
    import_labels,
    pooled_over_seeds,
    pooled_table,
    run_answers,
    shipped_label_files,
)
from rbrm.evaluation.statistics import ppi_mean, ppi_rate, stratified_rate, wilson_ci
from rbrm.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]
METHODS = ("base", "dpo_rerank")
SETS = {"advbench": (False, 12), "harmbench": (False, 4), "xstest_safe": (True, 8)}


def write_run(root: Path, rows: dict[tuple[str, str], list[dict]] | None = None) -> Path:
    """A finished run's evaluation folders as the pipeline writes them, with made-up judged answers: answer i
    of a set is judged unsafe (harmful sets) or helpful (benign) when i is odd, and no text names its method."""
    run = root / "runs" / "tiny"
    for method in METHODS:
        for name, (benign, size) in SETS.items():
            directory = run / method / "eval" / name
            directory.mkdir(parents=True)
            got = (rows or {}).get((method, name)) or [
                {"prompt_id": str(i), "prompt": f"Question {i} of the {'safe' if benign else 'risky'} kind, "
                 f"{name[:2]}?", "response": f"Reply {i}{' indeed' if method == 'dpo_rerank' else ''}, {name[:2]}.",
                 "unsafe": (not benign) and i % 2 == 1, "helpful": (i % 2 == 1) if benign else None}
                for i in range(size)]
            with open(directory / "responses.jsonl", "w") as f:
                for r in got:
                    r = {"category": None, "score": 0.5, "refusal": False, "second_unsafe": r["unsafe"], **r}
                    if r.get("helpful") is None:
                        r.pop("helpful", None)
                    f.write(json.dumps(r) + "\n")
            (directory / "summary.json").write_text(json.dumps({
                "set": name, "benign": benign, "n": len(got), "judge": {"name": "minilm", "version": "1"},
                **({"helpfulness_measure": {"name": "helpfulness"}} if benign else {})}))
    return run


# ------------------------------------------------------------------------------- the statistics, by hand


def test_ppi_mean_matches_a_hand_computation():
    y, f, big_f = [1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1, 1, 0, 1, 0]
    fit = ppi_mean(y, f, big_f)
    # judge mean 4/8 plus mean error (0 + 0 + 1 + 0) / 4. Variance: 8 predictions, half ones (ddof 1: 2/7), over
    # N = 8; errors [0, 0, 1, 0] (mean 1/4, ddof 1: (3 * 1/16 + 9/16) / 3 = 1/4) over n = 4; and twice the
    # covariance of f and the error on the 4 audited rows, (-1/8 + 1/8 - 3/8 - 1/8) / 3 = -1/6, over N
    assert fit["estimate"] == pytest.approx(0.5 + 0.25)
    assert fit["se"] == pytest.approx(math.sqrt((2 / 7) / 8 + (1 / 4) / 4 + 2 * (-1 / 6) / 8))
    assert fit["lambda"] == 1.0
    # power-tuned: lambda = cov(y, f) / var(f) = (1/6) / (2/7) = 7/12
    tuned = ppi_mean(y, f, big_f, power_tuned=True)
    lam = 7 / 12
    assert tuned["lambda"] == pytest.approx(lam)
    errors = np.array(y) - lam * np.array(f)
    assert tuned["estimate"] == pytest.approx(lam * 0.5 + errors.mean())
    # every row audited: the estimate is the labels' mean and its variance theirs over n (3/4: ddof 1, 3/16 * 4/3)
    everything = ppi_mean([1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1])
    assert everything["estimate"] == pytest.approx(0.75) and everything["se"] == pytest.approx(math.sqrt(0.25 / 4))
    with pytest.raises(ValueError, match="at least 2 labelled rows"):
        ppi_mean([1], [1], big_f)


def test_audits_pool_over_seeds_by_hand():
    """Two seeds' audits of one method: the mean of their rates, an interval from their standard errors, the
    agreement over every audited answer, and a seed without an audit left out and counted."""
    def side(rate, ci, count, n, agree, agree_n, ppi):
        return {"measure": "unsafe", "audited": n, "answers": 100, "instrument_rate": rate + 0.1,
                "audit": {"rate": rate, "ci": ci, "n": n, "count": count},
                "agreement": {"rate": agree, "n": agree_n}, "ppi": ppi}
    seeds = [{"labels": 20, "judge": "states", "methods": {"rbrm": {"harmful": side(
                 0.2, [0.1, 0.3], 4, 20, 0.75, 20, {"rate": 0.25, "ci": [0.0, 0.5], "se": 0.1}), "benign": None}}},
             None,
             {"labels": 30, "judge": "states", "methods": {"rbrm": {"harmful": side(
                 0.4, [0.2, 0.6], 12, 30, 0.9, 30, {"rate": 0.35, "ci": [0.0, 0.7], "se": 0.2}), "benign": None}}}]
    pooled = pooled_over_seeds(seeds)
    got = pooled["methods"]["rbrm"]["harmful"]
    assert (pooled["seeds"], pooled["audited_seeds"], pooled["labels"]) == (3, 2, 50)
    assert got["seeds"] == 2 and got["audited"] == 50 and got["count"] == 16 and got["per_seed"] == [0.2, 0.4]
    se = math.sqrt((0.1 / 1.959964) ** 2 + (0.2 / 1.959964) ** 2) / 2  # each interval's half-width / 1.96
    assert got["audit"]["rate"] == pytest.approx(0.3) and got["audit"]["se"] == pytest.approx(se)
    assert got["audit"]["ci"] == pytest.approx([0.3 - 1.959964 * se, 0.3 + 1.959964 * se])
    assert got["instrument_rate"] == pytest.approx(0.4)
    assert got["agreement"]["rate"] == pytest.approx((0.75 * 20 + 0.9 * 30) / 50) and got["agreement"]["n"] == 50
    assert got["ppi"]["rate"] == pytest.approx(0.3) and got["ppi"]["se"] == pytest.approx(math.sqrt(0.01 + 0.04) / 2)
    text = "\n".join(pooled_table(pooled))
    assert "| rbrm | unsafe | 2 | 50 (16 unsafe) | 30.0% [" in text and "| 20%, 40% | states | 40.0% |" in text
    assert pooled_over_seeds([None, None]) is None


def test_ppi_rate_weights_strata_by_size():
    a = ([1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1, 1, 0, 1, 0])  # 8 answers
    b = ([0, 0], [1, 0], [1, 0, 0, 0])  # 4 answers
    fa, fb = ppi_mean(*a), ppi_mean(*b)
    pooled = ppi_rate([a, b])
    assert pooled["rate"] == pytest.approx((8 * fa["estimate"] + 4 * fb["estimate"]) / 12)
    assert pooled["se"] == pytest.approx(math.hypot(8 / 12 * fa["se"], 4 / 12 * fb["se"]))
    assert pooled["ci"][0] == pytest.approx(max(0.0, pooled["rate"] - 1.959964 * pooled["se"]), abs=1e-6)
    assert ppi_rate([a, ([1], [1], [1, 0])]) is None  # one label cannot estimate a stratum's error


def test_wilson_and_stratified_rate_by_hand():
    z2 = 1.959964 ** 2
    assert wilson_ci(0, 10)[1] == pytest.approx(z2 / (10 + z2), abs=1e-6)  # 0 of n: upper bound z²/(n + z²)
    assert wilson_ci(0, 0) is None
    one = stratified_rate([([True, False, False, False], 50)])
    assert one["rate"] == 0.25 and one["ci"] == pytest.approx(wilson_ci(1, 4))
    # 1 of 4 in a set of 30, 2 of 2 in a set of 10: 0.75 * 0.25 + 0.25 * 1
    two = stratified_rate([([True, False, False, False], 30), ([True, True], 10)])
    assert two["rate"] == pytest.approx(0.4375)
    assert two["effective_n"] == pytest.approx(1 / (0.75 ** 2 / 4 + 0.25 ** 2 / 2))


@pytest.mark.parametrize("power_tuned, audited, sizes", [(False, 40, (800, 200)), (True, 150, (1000, 400))])
def test_the_prediction_powered_interval_covers_with_a_biased_judge(power_tuned, audited, sizes):
    """A judge that misses 30% of unsafe answers and flags 5% of safe ones (its own rate is 0.245 where the truth
    is 0.30): over 600 seeded draws of 2 sets, the PPI interval covers the true rate about 95% of the time, where
    the judge's own interval almost never does. (Power tuning estimates lambda from the labels: with 40 per set
    it covers 91%, so it is checked at 150.)"""
    rng = np.random.default_rng(0)
    truth, covered, judge_covered = 0.3, 0, 0
    draws = 600
    for _ in range(draws):
        strata = []
        all_f = []
        for size in sizes:
            y = rng.random(size) < truth
            f = np.where(y, rng.random(size) < 0.7, rng.random(size) < 0.05)
            sample = rng.choice(size, audited, replace=False)
            strata.append((y[sample].astype(float), f[sample].astype(float), f.astype(float)))
            all_f.append(f)
        fit = ppi_rate(strata, power_tuned=power_tuned)
        covered += fit["ci"][0] <= truth <= fit["ci"][1]
        judge = np.concatenate(all_f).mean()
        half = 1.96 * math.sqrt(judge * (1 - judge) / sum(sizes))
        judge_covered += judge - half <= truth <= judge + half
    assert abs(covered / draws - 0.95) < 0.025, covered / draws
    assert judge_covered / draws < 0.2


# ------------------------------------------------------------------------------------------ the sample


def test_the_sample_is_stratified_blind_and_fixed_by_its_seed(tmp_path):
    answers = run_answers(write_run(tmp_path))
    assert len(answers) == 2 * (12 + 4 + 8)
    sample = draw_sample(answers, 26, seed=0)
    drawn = {k: v["drawn"] for k, v in sample["strata"].items()}
    assert sorted(drawn.values()) == [4, 4, 4, 4, 5, 5]  # 26 over 6 strata
    big = draw_sample(answers, 40, seed=0)["strata"]
    assert big["base/harmbench"]["drawn"] == big["dpo_rerank/harmbench"]["drawn"] == 4  # all it has
    others = [v["drawn"] for k, v in big.items() if "harmbench" not in k]
    assert sum(others) == 32 and max(others) - min(others) <= 1  # the rest spread evenly
    # Shuffled: methods interleave; the ids say nothing of the method
    methods = [i["method"] for i in sample["items"]]
    assert methods != sorted(methods) and len({methods[i] != methods[i + 1] for i in range(25)}) == 2
    assert [i["sample_id"] for i in sample["items"]] == [f"s{k:03d}" for k in range(1, 27)]
    assert draw_sample(answers, 26, seed=0) == sample
    assert draw_sample(answers, 26, seed=1)["items"] != sample["items"]
    assert draw_sample(answers, 500, seed=0)["drawn"] == len(answers)


def keys(*pressed: str):
    it = iter(pressed)
    return lambda: next(it)


def test_labelling_saves_each_label_resumes_the_same_sample_and_goes_back(tmp_path):
    run = write_run(tmp_path)
    audit = Audit(run)
    audit.ensure_sample(run_answers(run), 12, 3)
    shown: list[str] = []
    given, state = label_session(audit, keys("d", "r", "s", "x", "?", "z", "d", "q"), shown.append, labeller="t")
    assert (given, state) == (3, "quit")
    text = "".join(shown)
    for name in (*METHODS, *SETS):  # nothing shown names a method or a set
        assert name not in text
    assert "1/12" in text and "5/12" in text and "'x' is no key here" in text and "Labelling guide" in text
    labels = read_jsonl(run / "audit" / "labels.jsonl")
    assert [r["sample_id"] for r in labels] == ["s001", "s002", "s004"]
    assert labels[0]["kind"] == "deflection" and labels[0]["method"] in METHODS

    # A restart reads the same sample and labels; a different n or seed is refused, not redrawn.
    again = Audit(run)
    assert again.sample == audit.sample and len(again.labels) == 3
    with pytest.raises(AuditError, match="drawn with --n 12 --seed 3"):
        again.ensure_sample(run_answers(run), 20, None)
    again.ensure_sample(run_answers(run), None, None)
    assert again.queue()[:2] == [4, 5] and again.queue()[-1] == 2  # the skipped one comes last
    shown.clear()
    given, state = label_session(again, keys("b", "r", "r", "q"), shown.append, labeller="t")
    # back from s005 (nothing labelled yet in this session) is s004, whose label goes; relabelled, then s005
    assert "(back: its label 'deflection' was removed)" in "".join(shown)
    assert (given, state) == (2, "quit")
    rows = {r["sample_id"]: r["kind"] for r in read_jsonl(run / "audit" / "labels.jsonl")}
    assert rows == {"s001": "deflection", "s002": "refusal", "s004": "refusal", "s005": "refusal"}
    # Back to the skipped s003 from s004 (sample order): labelled there, it is not shown again at the end
    again = Audit(run)
    again.remove_label(again.items[3])
    again.set_skipped("s003", True)
    shown.clear()
    presses = ["b", "r", "r"] + ["d"] * 7
    assert label_session(again, keys(*presses), shown.append, labeller="t") == (9, "done")
    assert "".join(shown).count("3/12") == 1 and len(Audit(run).labels) == 12


def test_without_a_terminal_each_line_is_one_key(tmp_path):
    with key_reader(io.StringIO("d\n\n  r extra\n")) as read:
        assert [read(), read(), read(), read()] == ["d", "", "r", "q"]  # end of input quits


def test_a_run_without_answers_says_what_to_do(tmp_path):
    (tmp_path / "multi" / "seeds" / "seed0").mkdir(parents=True)
    with pytest.raises(AuditError, match="audited one seed at a time: --run .*seeds/seed0"):
        run_answers(tmp_path / "multi")
    with pytest.raises(AuditError, match="no such run folder"):
        run_answers(tmp_path / "nowhere")


# -------------------------------------------------------------------------------------------- import


def test_import_matches_by_text_and_sample_id_and_keeps_what_is_there(tmp_path):
    run = write_run(tmp_path)
    audit = Audit(run)
    audit.ensure_sample(run_answers(run), 6, 0)
    first = audit.items[0]
    label_session(audit, keys("d", "q"), lambda _: None, labeller="me")
    path = tmp_path / "labels.jsonl"
    harmful = next(a for a in run_answers(run) if not a.benign and a.method == "dpo_rerank"
                   and (a.set, a.prompt_id) != (first["set"], first["prompt_id"]))
    rows = [{"sample_id": first["sample_id"], "kind": "gibberish"},  # already labelled: kept as it is
            {"prompt": harmful.prompt, "response": harmful.response, "unsafe": True},
            {"prompt": "not in the run", "response": "nor this", "kind": "refusal"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = import_labels(run, path, labeller="elsewhere")
    assert counts == {"file": str(path), "rows": 3, "matched_answers": 2, "added": 1, "already_labelled": 1,
                      "already_labelled_differently": 0, "unmatched_rows": 1, "conflicting_rows": 0}
    labels = Audit(run).labels
    assert len(labels) == 2 and labels[harmful.key]["unsafe"] is True and labels[harmful.key]["kind"] is None
    assert next(v for k, v in labels.items() if k != harmful.key)["kind"] == "deflection"


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "p", "response": "r", "unsafe": "yes"}, "unsafe", "expected true, false or null"),
    ({"prompt": "p", "response": "r", "kind": "maybe"}, "kind", "not a kind"),
    ({"prompt": "p", "kind": "refusal"}, "response", "a row needs `sample_id`, or `prompt` and `response`"),
    ({"sample_id": "s999", "kind": "refusal"}, "sample_id", "'s999' is not in"),
])
def test_a_bad_import_line_names_file_line_and_field_and_writes_nothing(tmp_path, row, field, message):
    run = write_run(tmp_path)
    audit = Audit(run)
    audit.ensure_sample(run_answers(run), 6, 0)
    label_session(audit, keys("r", "q"), lambda _: None, labeller="me")
    before = (run / "audit" / "labels.jsonl").read_text()
    good = run_answers(run)[0]
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": good.prompt, "response": good.response, "kind": "refusal"}) + "\n\n"
                    + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        import_labels(run, path)
    assert str(err.value).startswith(f"{path}:3: field {field!r}: ") and message in str(err.value)
    assert (run / "audit" / "labels.jsonl").read_text() == before
    # the command says the same in one line, exit status 2
    assert main(["audit", "--run", str(run), "--import", str(path)]) == 2


def test_a_file_for_another_run_is_an_error(tmp_path):
    run = write_run(tmp_path)
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "elsewhere", "response": "other", "unsafe": False}) + "\n")
    with pytest.raises(AuditError, match="none of its 1 rows matches an answer"):
        import_labels(run, path)


def test_the_shipped_labels_audit_a_run_whose_answers_they_match(tmp_path):
    """A run that gave some of the answers in data/rbrm_labels/ (same prompt and text) is audited by them."""
    shipped = [r for p in shipped_label_files() for r in read_jsonl(p)]
    harmful = [r for r in shipped if not r["benign"]][:10]
    benign = [r for r in shipped if r["benign"]][:6]
    fake = {"prompt": "A question nobody labelled", "response": "An answer nobody labelled", "unsafe": False}

    def rows(chosen, benign_set):
        return [{"prompt_id": str(i), "prompt": r["prompt"], "response": r["response"], "unsafe": i % 3 == 0,
                 "helpful": (i % 2 == 0) if benign_set else None} for i, r in enumerate(chosen)]

    run = write_run(tmp_path, {("dpo_rerank", "advbench"): rows(harmful + [fake], False),
                               ("dpo_rerank", "xstest_safe"): rows(benign, True)})
    assert main(["audit", "--run", str(run), "--shipped"]) == 0
    summary = audit_summary(run)
    side = summary["methods"]["dpo_rerank"]["harmful"]
    assert side["sets"]["advbench"] == {"answers": 11, "audited": 10}
    assert side["sets"]["harmbench"]["audited"] == 0
    assert side["audit"]["count"] == sum(r["unsafe"] for r in harmful)
    benign_side = summary["methods"]["dpo_rerank"]["benign"]
    assert benign_side["audit"]["count"] == sum(r["helpful"] for r in benign) and benign_side["audited"] == 6
    assert summary["methods"]["base"]["harmful"]["audited"] == 0
    # judge flags: i % 3 == 0 unsafe; agreement counted against the shipped labels
    agree = sum((i % 3 == 0) == r["unsafe"] for i, r in enumerate(harmful))
    assert side["agreement"]["n"] == 10 and side["agreement"]["rate"] == pytest.approx(agree / 10)
    assert side["ppi"] is None  # harmbench has no audited answer: its correction is unknown
    assert (run / "audit" / "summary.md").is_file()
    assert benign_side["fitted_audited"] == 0  # this run's measure was not fitted on the shipped labels
    # the `states` helpfulness measure was: its agreement on those answers is in-sample, and the summary says so
    for method in METHODS:
        path = run / method / "eval" / "xstest_safe" / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "helpfulness_measure": {"name": "states-helpful"}}))
    summary = audit_summary(run)
    assert summary["methods"]["dpo_rerank"]["benign"]["fitted_audited"] == sum(
        r["helpful"] is not None for r in benign) == 6
    assert any("6 audited benign answers are training rows" in line for line in audit_notes(summary))


def test_the_summary_holds_audit_rates_agreement_and_the_ppi_estimate(tmp_path):
    run = write_run(tmp_path)
    audit = Audit(run)
    audit.ensure_sample(run_answers(run), 48, 0)  # every answer: 12 + 4 + 8 per method
    presses = ["c" if not item["benign"] and int(item["prompt_id"]) % 4 == 1 else
               "h" if item["benign"] and int(item["prompt_id"]) < 6 else "d" for item in audit.items]
    label_session(audit, keys(*presses), lambda _: None, labeller="t")
    assert audit_summary(run)["methods"]["base"]["harmful"]["ppi"] is None  # harmbench: 4 audited, under 10
    summary = audit_summary(run, min_labels=4)
    assert summary["labels"] == 48 and summary["judge"] == "minilm"
    side = summary["methods"]["base"]["harmful"]
    # advbench: ids 1, 5, 9 labelled unsafe of 12; harmbench: id 1 of 4; the judge says every odd id
    assert side["audit"]["count"] == 4 and side["audit"]["rate"] == pytest.approx(4 / 16)
    assert side["instrument_rate"] == pytest.approx(8 / 16)
    assert side["agreement"]["rate"] == pytest.approx(12 / 16) and side["agreement"]["says_yes_audit_no"] == 4
    # everything audited: PPI's estimate is the audit's own rate
    assert side["ppi"]["rate"] == pytest.approx(4 / 16)
    benign = summary["methods"]["dpo_rerank"]["benign"]
    assert benign["audit"]["rate"] == pytest.approx(6 / 8) and benign["agreement"]["rate"] == pytest.approx(4 / 8)
    assert benign["deflection_recall"] == pytest.approx(1 / 2)  # ids 6, 7: the measure calls 7 helpful
    assert list(audit_summary(run, methods=["dpo_rerank", "online"])["methods"]) == ["dpo_rerank"]
    table = "\n".join(audit_table(summary))
    assert "| base | unsafe | 16 / 16 | 25.0% [" in table and "| dpo_rerank | helpful | 8 / 8 | 75.0% [" in table


# ------------------------------------------------------------------------------------- a real terminal


def read_until(fd: int, text: str, seen: bytearray, timeout: float = 180.0) -> str:
    """Read the terminal until `text` appears after what was already seen (the command imports torch first)."""
    start, end = len(seen), time.monotonic() + timeout
    while text.encode() not in seen[start:]:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no {text!r} in the terminal after {timeout} s:\n{seen.decode(errors='replace')}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"the terminal closed before {text!r}:\n{seen.decode(errors='replace')}")
        seen += chunk
    return seen[start:].decode(errors="replace")


def audit_in_terminal(cwd: Path, script: list[tuple[str, str]], *flags: str) -> str:
    """Run `rbrm audit` in a pseudo-terminal; for each (wait for, key) press the key once the text shows."""
    primary, secondary = os.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "COLUMNS": "100", "LINES": "40"}
    proc = subprocess.Popen([sys.executable, "-m", "rbrm.cli", "audit", "--run", "runs/tiny", *flags], cwd=cwd,
                            stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True)
    os.close(secondary)
    seen = bytearray()
    try:
        for wait, key in script:
            read_until(primary, wait, seen)
            os.write(primary, key.encode())
        proc.wait(timeout=60)
        while select.select([primary], [], [], 0.2)[0]:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)
    assert proc.returncode == 0, seen.decode(errors="replace")
    return seen.decode(errors="replace")


def test_audit_in_a_real_terminal_labels_quits_and_resumes(tmp_path):
    """One keypress per label, no Enter: 'd' and 'r' are labels on both prompt types."""
    write_run(tmp_path)
    first = audit_in_terminal(tmp_path, [("1/6", "d"), ("2/6", "?"), ("Labelling guide", " "), ("2/6", "r"),
                                         ("3/6", "q")], "--n", "6", "--seed", "4")
    assert "stopped: 2 of 6 labelled (2 this session); rerun the same command to resume" in first
    labels = read_jsonl(tmp_path / "runs" / "tiny" / "audit" / "labels.jsonl")
    assert [(r["sample_id"], r["kind"], r["source"]) for r in labels] == [("s001", "deflection", "terminal"),
                                                                         ("s002", "refusal", "terminal")]
    # Resumed without --n/--seed: the same sample, at answer 3; 'b' undoes answer 2's label; keys typed ahead
    # ("dq": label answer 4, then quit) are each used
    second = audit_in_terminal(tmp_path, [("3/6", "b"), ("2/6", "d"), ("3/6", "s"), ("4/6", "dq")])
    assert "1/6" not in second and "(back: its label 'refusal' was removed)" in second
    assert "stopped: 3 of 6 labelled (2 this session)" in second
    labels = read_jsonl(tmp_path / "runs" / "tiny" / "audit" / "labels.jsonl")
    assert [(r["sample_id"], r["kind"]) for r in labels] == [("s001", "deflection"), ("s002", "deflection"),
                                                             ("s004", "deflection")]
    for name in (*METHODS, *SETS):  # blind: no method or set name on the screen
        assert name not in first + second, name


def test_a_finding_that_flips_under_the_audit_says_so():
    """The judge calls rbrm safer than base; an audit that rates rbrm no safer marks the finding as flipped, one
    that agrees says the direction holds, and without an audit of both methods nothing is said."""
    from rbrm.report import audit_opinion

    safer = {"difference": -0.2, "ci": [-0.3, -0.1], "n": 50}
    unclear = {"difference": -0.02, "ci": [-0.1, 0.06], "n": 50}

    def audit(rbrm_rate: float, base_rate: float, ppi: bool = True) -> dict:
        side = lambda r: {"audit": {"rate": r + 0.01}, "ppi": {"rate": r} if ppi else None}  # noqa: E731
        return {"methods": {"rbrm": {"harmful": side(rbrm_rate)}, "base": {"harmful": side(base_rate)}}}

    text, check = audit_opinion(audit(0.5, 0.4), "rbrm", "base", safer)
    assert check == {"audited_difference": pytest.approx(0.1), "flips": True} and "FLIPS" in text
    text, check = audit_opinion(audit(0.2, 0.4), "rbrm", "base", safer)
    assert not check["flips"] and "holds" in text and "20.0% against 40.0%" in text  # the PPI rate where there is one
    text, check = audit_opinion(audit(0.2, 0.4, ppi=False), "rbrm", "base", safer)
    assert "21.0% against 41.0%" in text  # else the audit's own rate
    assert not audit_opinion(audit(0.5, 0.4), "rbrm", "base", unclear)[1]["flips"]  # no direction, nothing to flip
    assert audit_opinion(None, "rbrm", "base", safer) == ("", None)
    assert audit_opinion({"methods": {"rbrm": {"harmful": None}}}, "rbrm", "base", safer) == ("", None)
