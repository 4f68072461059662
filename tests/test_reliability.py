"""What a reliability trial found by hand: bad inputs, empty and over-length rows, corrupt files, concurrent
writers, kill and resume. Each test fails on the code before its fix."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rbrm.cli import main  # noqa: E402
from rbrm.errors import (
    DataError,  # noqa: E402
    OutputLockedError,  # noqa: E402
)
from rbrm.formats import PromptRecord, load_examples, load_prompts, load_scored_samples  # noqa: E402
from tests.conftest import make_tiny_model  # sets the offline environment first

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, what the user saw on stderr), whether the command returned or raised SystemExit."""
    try:
        code = main(argv)
        shown = capsys.readouterr().err
    except SystemExit as exit_:
        code = 1 if isinstance(exit_.code, str) else int(exit_.code or 0)
        shown = capsys.readouterr().err + (exit_.code if isinstance(exit_.code, str) else "")
    return code, shown


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------- messages, not tracebacks

COMMANDS = {
    "probe train": lambda f, t, m: ["probe", "train", "--model", m, "--data", f, "--out", str(t / "rm")],
    "sample": lambda f, t, m: ["sample", "--model", m, "--prompts", f, "--out", str(t / "s.jsonl")],
    "rerank": lambda f, t, m: ["rerank", "--model", m, "--reward", str(t / "rm"), "--samples", f,
                               "--out-dir", str(t / "rr")],
    "dpo": lambda f, t, m: ["dpo", "--model", m, "--pairs", f, "--output_dir", str(t / "d")],
    "eval": lambda f, t, m: ["eval", "--model", m, "--prompts", f, "--out", str(t / "e"), "--judge", "refusal"],
    "judge": lambda f, t, m: ["judge", "--data", f, "--out", str(t / "j.jsonl"), "--judge", "refusal"],
}


def bad_file(kind: str, tmp_path: Path) -> tuple[str, str]:
    """(path, what the message must say) for a non-UTF-8 file, a directory and a missing file."""
    if kind == "not_utf8":
        path = tmp_path / "latin1.jsonl"
        path.write_bytes(b'{"prompt": "ok", "response": "fine", "label": 1}\n'
                         b'{"prompt": "caf\xe9", "response": "x", "label": 1}\n')
        return str(path), "latin1.jsonl:2: not UTF-8 text: byte 0xe9 at column 16"
    if kind == "directory":
        path = tmp_path / "folder.jsonl"
        path.mkdir()
        return str(path), "folder.jsonl: is a directory"
    return str(tmp_path / "missing.jsonl"), "missing.jsonl: file not found"


@pytest.mark.parametrize("kind", ["not_utf8", "directory", "missing"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_input_is_a_message_naming_the_file(command, kind, tmp_path, tiny_model_dir, capsys):
    path, expected = bad_file(kind, tmp_path)
    code, shown = run_cli(COMMANDS[command](path, tmp_path, tiny_model_dir), capsys)
    assert code != 0
    assert expected in shown, shown
    assert "Traceback" not in shown


def test_a_bad_row_is_one_line_not_a_traceback(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response_0": "b", "response_1": "c",
                                                   "safer_response_id": 7}])
    code, shown = run_cli(COMMANDS["probe train"](data, tmp_path, tiny_model_dir), capsys)
    assert code == 2
    assert "rbrm probe train: error: " in shown and "pairs.jsonl:1: field 'safer_response_id'" in shown
    assert "Traceback" not in shown and len(shown.strip().splitlines()) == 2  # the message and the debug hint


def test_eval_checks_prompt_files_before_loading_the_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import rbrm.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompt files were checked")

    monkeypatch.setattr(rbrm.models, "load_model", no_loading)
    good = write_jsonl(tmp_path / "harm.jsonl", [{"prompt": "a"}])
    bad = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a"}, {"nothing": 1}])
    code, shown = run_cli(["eval", "--model", tiny_model_dir, "--prompts", good, bad, "--out", str(tmp_path / "e"),
                           "--judge", "refusal"], capsys)
    assert code == 2 and "broken.jsonl:2: field 'prompt': missing" in shown


def test_malformed_json_reports_its_own_column(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "label": 1}\n{"prompt": "a",\n')
    with pytest.raises(DataError, match=r"cut\.jsonl:2: malformed JSON: .*\(column 16\)"):
        load_examples(path)


# ------------------------------------------------------------------------------------------ empty responses


def test_rerank_never_pairs_an_empty_response(tmp_path, tokenizer, tiny_model, tiny_model_dir):
    from rbrm.rerank import rerank_file
    from tests.test_trainer import make_probe

    make_probe(tiny_model, tokenizer).save(str(tmp_path / "rm"))
    rows = [{"prompt_id": f"p{i}", "sample_index": j, "prompt": f"question {i}", "response": text}
            for i in range(3) for j, text in enumerate(["", f"an answer to {i}"])]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    result = rerank_file(tiny_model_dir, str(tmp_path / "rm"), samples, progress=False)
    assert result.pairs == []  # each prompt has one usable response: nothing to pair
    assert result.summary["skipped"]["empty_responses"] == 3
    assert all(s.response for group in result.ranked.values() for s in group)


def test_probe_data_drops_empty_labelled_responses(tmp_path):
    data = write_jsonl(tmp_path / "pku.jsonl", [
        {"prompt": "q", "response_0": "", "response_1": "No.", "safer_response_id": 1,
         "is_response_0_safe": True, "is_response_1_safe": True},
        {"prompt": "q2", "response_0": "Sure, here", "response_1": "No.", "safer_response_id": 1,
         "is_response_0_safe": False, "is_response_1_safe": True}])
    pairs, labelled = load_examples(data)
    assert len(pairs) == 1 and pairs[0].prompt == "q2"
    assert [item.response for item in labelled] == ["No.", "Sure, here", "No."]  # the empty one is gone


def test_judges_mark_empty_responses(caplog):
    from rbrm.judges import EMPTY_RESPONSE, RefusalPatternJudge

    with caplog.at_level(logging.WARNING):
        results = RefusalPatternJudge().judge(["a", "b"], ["  ", "Sure, step 1"])
    assert results[0].unsafe is False and results[0].category == EMPTY_RESPONSE
    assert results[1].unsafe is True and results[1].category != EMPTY_RESPONSE
    assert "1 of 2 responses are empty" in caplog.text


# ------------------------------------------------------------------------------------------ over-length rows


@pytest.fixture()
def short_context_model(tokenizer):
    model = make_tiny_model(tokenizer)
    model.config.max_position_embeddings = 64
    return model


def test_sampling_skips_prompts_past_the_context(short_context_model, tokenizer, tmp_path, caplog):
    from rbrm.sampling import DecodingConfig, generate_responses

    prompts = [PromptRecord("short", "Hi", source="p.jsonl:1"), PromptRecord("long", "word " * 200, source="p.jsonl:2")]
    calls = []

    def backend(texts, counts, seed):
        calls.append(len(texts))
        return [[("ok", "stop", 1)] * c for c in counts]

    stats: dict = {}
    with caplog.at_level(logging.WARNING):
        rows = generate_responses(short_context_model, tokenizer, prompts, 1, DecodingConfig(max_new_tokens=8),
                                  str(tmp_path / "s.jsonl"), backend=backend, stats=stats, progress=False)
    assert [r["prompt_id"] for r in rows] == ["short"] and stats["skipped_too_long"] == 1
    assert "p.jsonl:2" in caplog.text and "context of 64" in caplog.text


def test_probe_and_rerank_skip_rows_past_the_context(short_context_model, tokenizer):
    from rbrm.formats import LabelledResponse, PreferencePair
    from rbrm.probe_train import drop_too_long
    from rbrm.rerank import Sample, unusable

    pairs = [PreferencePair("Hi", "Hello", "Go away", "a:1"), PreferencePair("word " * 200, "x", "y", "a:2")]
    labelled = [LabelledResponse("Hi", "Hello", True, "b:1"), LabelledResponse("Hi", "long " * 200, False, "b:2")]
    kept_pairs, kept_labelled, dropped = drop_too_long(short_context_model, tokenizer, pairs, labelled)
    assert kept_pairs == pairs[:1] and kept_labelled == labelled[:1] and dropped == ["a:2", "b:2"]
    samples = [Sample("p", "Hi", "Hello", 0, 0), Sample("p", "Hi", "long " * 200, 1, 1), Sample("p", "Hi", "", 2, 2)]
    bad = unusable(short_context_model, tokenizer, samples)
    assert bad["too_long"] == samples[1:2] and bad["empty_responses"] == samples[2:]


def _pairs_dataset(tokenizer):
    from tests.test_trainer import dataset

    return dataset(tokenizer, confidence=False)


def test_dpo_says_what_it_drops_and_truncates(tokenizer, tmp_path, caplog):
    from rbrm.dpo import ConfidenceDPOTrainer, render_and_tokenize
    from tests.test_trainer import config

    data = _pairs_dataset(tokenizer)
    lengths = [len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"]))
               for t in (render_and_tokenize(row, tokenizer) for row in data)]
    model = make_tiny_model(tokenizer)
    model.config.max_position_embeddings = max(lengths) - 1
    with caplog.at_level(logging.WARNING):
        trainer = ConfidenceDPOTrainer(model, args=config(tmp_path, max_length=None, confidence="none"),
                                       train_dataset=data, processing_class=tokenizer)
    kept = sum(n <= max(lengths) - 1 for n in lengths)
    assert len(trainer.train_dataset) == kept < len(lengths)
    assert f"dropped {len(lengths) - kept} of {len(lengths)} pairs longer than the model's context" in caplog.text
    assert trainer.pair_counts["train"]["dropped_too_long"] == len(lengths) - kept

    caplog.clear()
    prompt_min = min(len(render_and_tokenize(row, tokenizer)["prompt_ids"]) for row in data)
    with caplog.at_level(logging.WARNING):
        ConfidenceDPOTrainer(make_tiny_model(tokenizer), args=config(tmp_path, max_length=prompt_min + 2,
                                                                     confidence="none"),
                             train_dataset=data, processing_class=tokenizer)
    assert "lose their end-of-turn token to max_length" in caplog.text
    assert "with a prompt of max_length" in caplog.text  # the longer prompts are dropped, and said so


# ------------------------------------------------------------------------------------------ corrupt files


@pytest.fixture()
def saved_probe(tmp_path, tokenizer, tiny_model) -> Path:
    from tests.test_trainer import make_probe

    make_probe(tiny_model, tokenizer).save(str(tmp_path / "rm"))
    return tmp_path / "rm"


def test_flipped_probe_bytes_are_refused(saved_probe):
    from rbrm.reward_model import WEIGHTS_FILE, HybridRewardModel

    path = saved_probe / WEIGHTS_FILE
    raw = bytearray(path.read_bytes())
    raw[-40:-20] = bytes(b ^ 0xFF for b in raw[-40:-20])  # inside the tensor data, not the header
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum .* differs"):
        HybridRewardModel.load(str(saved_probe))


@pytest.mark.parametrize("field", ["layers", "pooling", "end_of_turn"])
def test_probe_config_fields_are_required(saved_probe, field):
    from rbrm.reward_model import CONFIG_FILE, HybridRewardModel

    config = json.loads((saved_probe / CONFIG_FILE).read_text())
    del config[field]
    (saved_probe / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DataError, match=rf"config\.json: field '{field}': missing"):
        HybridRewardModel.load(str(saved_probe))


def test_invalid_probe_config_names_the_file(saved_probe):
    from rbrm.reward_model import CONFIG_FILE, HybridRewardModel

    (saved_probe / CONFIG_FILE).write_text('{"num_layers": 3,')
    with pytest.raises(DataError, match=r"rm/config\.json.*malformed JSON"):
        HybridRewardModel.load(str(saved_probe))


def test_model_config_that_does_not_fit_its_weights_is_refused(tiny_model_dir, tmp_path):
    import shutil

    from rbrm.models import ModelLoadError, load_model

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["num_hidden_layers"]  # transformers would build its default depth, most layers random
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no matching weights"):
        load_model(str(broken), device="cpu")


# ------------------------------------------------------------------------------------------ concurrent writers


def test_a_second_writer_is_refused_and_a_killed_one_releases(tmp_path, tiny_model, tokenizer):
    from rbrm.sampling import DecodingConfig, generate_responses

    out = tmp_path / "s.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rbrm.files import exclusive_writer\n"
                               "with exclusive_writer(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        prompts = [PromptRecord("a", "Hi")]

        def backend(texts, counts, seed):
            return [[("ok", "stop", 1)] * c for c in counts]

        with pytest.raises(OutputLockedError, match="another process is writing"):
            generate_responses(tiny_model, tokenizer, prompts, 2, DecodingConfig(), str(out), backend=backend,
                               progress=False)
        assert not out.exists()
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait()
    rows = generate_responses(tiny_model, tokenizer, prompts, 2, DecodingConfig(), str(out), backend=backend,
                              progress=False)
    assert len(rows) == 2


def test_two_concurrent_samplers_never_duplicate_rows(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(4)])
    out = tmp_path / "s.jsonl"
    argv = [sys.executable, "-m", "rbrm.cli", "sample", "--model", tiny_model_dir, "--prompts", prompts, "--n", "4",
            "--max-new-tokens", "8", "--batch-prompts", "1", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    keys = [(r["prompt_id"], r["sample_index"]) for r in map(json.loads, out.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 16
    assert any(code == 0 for code, _ in results)
    for code, err in results:
        assert code == 0 or "another process is writing" in err, err


def test_rerank_refuses_duplicate_samples(tmp_path):
    from rbrm.rerank import load_samples

    rows = [{"prompt_id": "p", "sample_index": i % 2, "prompt": "q", "response": f"r{i}"} for i in range(3)]
    with pytest.raises(DataError, match=r"s\.jsonl:3: field 'sample_index': .* appears twice \(first at line 1\)"):
        load_samples(write_jsonl(tmp_path / "s.jsonl", rows))


# ------------------------------------------------------------------------------------------ resume


def test_rerunning_rbrm_dpo_resumes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Killed after its step-2 checkpoint, the same command does steps 3-4 only; --overwrite_output_dir all 4."""
    from rbrm.dpo import ConfidenceDPOTrainer
    from tests.test_trainer import _write_pairs

    _write_pairs(tmp_path / "pairs.jsonl")
    argv = ["dpo", "--model", tiny_model_dir, "--pairs", str(tmp_path / "pairs.jsonl"), "--output_dir",
            str(tmp_path / "d"), "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2",
            "--confidence", "none", "--report_to", "none", "--gradient_checkpointing", "false", "--seed", "0"]
    original = ConfidenceDPOTrainer.training_step
    steps: list[int] = []

    def counting(self, *args, **kwargs):
        if kill_at is not None and len(steps) == kill_at:
            raise KeyboardInterrupt
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ConfidenceDPOTrainer, "training_step", counting)
    kill_at = 2
    assert main(argv) == 130 and (tmp_path / "d" / "checkpoint-2").is_dir()
    kill_at, steps[:] = None, []
    assert main(argv) == 0
    assert len(steps) == 2  # resumed at step 2
    assert json.loads((tmp_path / "d" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    steps[:] = []
    assert main(argv + ["--overwrite_output_dir"]) == 0
    assert len(steps) == 4


# ------------------------------------------------------------------------------------------ names and numbers


def test_run_names_cannot_leave_the_runs_folder(tmp_path):
    from rbrm.run_config import PipelineConfigError, load_config

    path = tmp_path / "p.yaml"
    path.write_text("name: ../../escaped_run\nmethods: [base]\neval:\n  prompts: [x.jsonl]\n")
    with pytest.raises(PipelineConfigError, match="plain folder name"):
        load_config(str(path))
    path.write_text("methods: [base]\neval:\n  prompts: [x.jsonl]\n")
    assert load_config(str(path)).name == "p"
    with pytest.raises(PipelineConfigError, match="must not leave it"):
        load_config(str(path), {"name": "/tmp/elsewhere"})


def test_csv_numbers_are_read_as_numbers(tmp_path):
    pku = tmp_path / "pairs.csv"
    with open(pku, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response_0", "response_1", "safer_response_id", "is_response_0_safe",
                         "is_response_1_safe"])
        writer.writerow(["q", "Sure, here is how", "I can't help with that.", "1", "False", "True"])
        writer.writerow(["q2", "No.", "Yes, do it like this", "0", "", "false"])
    pairs, labelled = load_examples(pku)
    assert [p.chosen for p in pairs] == ["I can't help with that.", "No."]
    assert [(x.response, x.safe) for x in labelled] == [("Sure, here is how", False),
                                                        ("I can't help with that.", True),
                                                        ("Yes, do it like this", False)]
    samples = tmp_path / "samples.csv"
    samples.write_text("prompt_id,prompt,response,sample_index,score\np,q,a,0,2.5\np,q,b,1,\n")
    rows = load_scored_samples(samples)
    assert [(s.index, s.score) for s in rows] == [(0, 2.5), (1, None)]
    labels = tmp_path / "labelled.csv"
    labels.write_text("prompt,response,label\nq,a,1\nq,b,unsafe\n")
    assert [x.safe for x in load_examples(labels)[1]] == [True, False]
    assert load_prompts(samples)[0].prompt == "q"


MALLOC_PROBE = """
import ctypes, resource
from rbrm.memory import glibc, keep_freed_memory
libc = glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
took = keep_freed_memory()
def faults(n=64 << 20):  # page faults of allocating, touching and freeing a 64 MiB block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(took, max(faults() for _ in range(3)))
"""


def test_freed_memory_is_reused_without_page_faults_unless_switched_off():
    """In a fresh process each time: mallopt cannot be undone. glibc's defaults map a 64 MiB block afresh at
    every allocation, and each new page faults; after keep_freed_memory the freed block is reused."""
    from rbrm.memory import glibc

    if glibc() is None:
        pytest.skip("not glibc")
    runs = {}
    for setting in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, check=True,
                             env={**os.environ, "RBRM_KEEP_FREED_MEMORY": setting}).stdout.split()
        runs[setting] = (out[0] == "True", int(out[1]))
    assert runs["1"][0] is True and runs["0"][0] is False
    assert runs["1"][1] < 64 < runs["0"][1]  # 16,385 with 4 KiB pages, at least 32 with 2 MiB ones
