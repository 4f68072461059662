"""The external data sets' layouts (PKU-SafeRLHF, HH-RLHF, TRL preference rows, the paper's sample files,
labelled responses, rbrm's answer labels, prompt lists), read into plain dataclasses with errors that point at
the bad row.

Every loader turns a file into dataclasses whose `prompt` is a `render.Prompt`, so the rest of the pipeline
never sees a data set's own layout. Reading the files themselves (encodings, jsonl/json/csv rows) is
`rbrm.files`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .files import iter_records, iter_values
from .render import Prompt, prompt_key

log = logging.getLogger(__name__)

REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # the datasets shipped in the repository, with licences
FORMATS = ("pku", "hh", "trl", "paper_samples", "labelled", "answer_labels", "prompts")
PROMPT_FIELDS = ("prompt", "question", "instruction", "goal", "Behavior", "behavior", "input", "text")
CATEGORY_FIELDS = ("category", "1-category", "SemanticCategory", "type", "risk_area")
ID_FIELDS = ("id", "qid", "BehaviorID")
LABEL_FIELDS = ("label", "safe", "is_safe")


@dataclass
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str
    source: str = ""  # "file:line"
    meta: dict = field(default_factory=dict)


@dataclass
class LabelledResponse:
    prompt: Prompt
    response: str
    safe: bool
    source: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class SafetyLabelledPair:
    """A helpfulness preference with a safety label on each response (PKU-SafeRLHF's `better_response_id` and
    `is_response_{0,1}_safe`): the data of methods that learn helpfulness under a safety constraint (SafeDPO)."""

    prompt: Prompt
    chosen: str  # the more helpful response
    rejected: str
    chosen_safe: bool
    rejected_safe: bool
    source: str = ""  # "file:line"
    meta: dict = field(default_factory=dict)


@dataclass
class PromptRecord:
    id: str
    prompt: Prompt
    category: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class ScoredSample:
    prompt: Prompt
    response: str
    score: float | None
    index: int
    prompt_id: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- field helpers

def _first_present(row: dict, names: Iterable[str]) -> str | None:
    return next((n for n in names if n in row), None)


def read_str(row: dict, key: str, path: Any, line: int) -> str:
    """`row[key]` as a string; DataError naming the file, line and field otherwise."""
    if key not in row or row[key] is None:
        raise DataError(path, line, key, "missing")
    if not isinstance(row[key], str):
        raise DataError(path, line, key, f"expected a string, got {type(row[key]).__name__}")
    return row[key]


def _messages(value: Any, path: Any, line: int, key: str) -> list[dict]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)
    if not ok:
        raise DataError(path, line, key, "expected a list of {'role', 'content'} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _as_prompt(messages: list[dict], path: Any, line: int, key: str) -> Prompt:
    """A conversation ending with a user turn; a lone user turn becomes a plain string."""
    if messages[-1]["role"] != "user":
        raise DataError(path, line, key, f"the prompt must end with a user turn, not {messages[-1]['role']!r}")
    return messages[0]["content"] if len(messages) == 1 else messages


def read_prompt(row: dict, key: str, path: Any, line: int) -> Prompt:
    """`row[key]` as a prompt: a string or a list of chat messages; DataError naming the file, line and field."""
    value = row.get(key)
    if isinstance(value, list):
        return _as_prompt(_messages(value, path, line, key), path, line, key)
    return read_str(row, key, path, line)


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _int(value: Any, path: Any, line: int, key: str, what: str = "an integer") -> int:
    """An integer, also when written as a string (a CSV cell is always one)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(path, line, key, f"expected {what}, got {value!r}")
    return value


def _float(value: Any, path: Any, line: int, key: str) -> float | None:
    """A number or null; numeric strings (CSV cells) count as numbers and an empty cell as null."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(path, line, key, f"expected a number or null, got {value!r}")
    return float(value)


def _bool_or_none(value: Any, path: Any, line: int, key: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE + ("",):
        text = value.strip().lower()
        return None if not text else text in _TRUE
    raise DataError(path, line, key, f"expected true, false or null, got {value!r}")


def _label(value: Any, path: Any, line: int, key: str) -> bool:
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("safe", "unsafe"):
        return text == "safe"
    if text in _TRUE + _FALSE:  # a CSV cell
        return text in _TRUE
    if isinstance(value, bool) or value in (0, 1):  # 1 / true = safe
        return bool(value)
    raise DataError(path, line, key, f"expected 'safe'/'unsafe', a bool or 0/1, got {value!r}")


_HH_TAG = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_PAPER_PREFIX = "Respond to this input:"
_PAPER_SUFFIX = re.compile(r"\n\s*output\s*:\s*(?:output\s*:\s*)?$")


def parse_hh_transcript(text: str, drop_empty_last: bool = True) -> list[dict]:
    """HH-RLHF's "\\n\\nHuman: …\\n\\nAssistant: …" as messages.

    A final empty "Assistant:" is the generation slot of a prompt, so it is dropped unless asked not to
    (a full transcript whose last answer is empty still has that answer).
    """
    parts = _HH_TAG.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH transcript (expected it to start with '\\n\\nHuman:')")
    messages = [{"role": "user" if tag == "Human" else "assistant", "content": body.strip()}
                for tag, body in zip(parts[1::2], parts[2::2])]
    if drop_empty_last and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the generation slot, not a message
    return messages


def unwrap_paper_prompt(text: str) -> str:
    """The prompt inside the paper's "Respond to this input:\\n\\n{prompt}\\n\\noutput:output :" wrapper."""
    if not text.startswith(_PAPER_PREFIX):
        return text
    return _PAPER_SUFFIX.sub("", text[len(_PAPER_PREFIX):]).strip()


# ---------------------------------------------------------------- preference / labelled formats

def detect_format(row: dict, path: Any = "<row>", line: int | None = None) -> str:
    """The layout of a row, from its keys (the first row decides for a whole file)."""
    keys = set(row)
    if {"response_0", "response_1"} <= keys:
        return "pku"
    if {"input", "output", "score"} <= keys:
        return "paper_samples"
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys or isinstance(row["chosen"], list):
            return "trl"
        return "hh"
    if {"response", "unsafe", "benign"} <= keys:
        return "answer_labels"
    if "response" in keys and keys & set(LABEL_FIELDS):
        return "labelled"
    if keys & set(PROMPT_FIELDS):
        return "prompts"
    raise DataError(path, line, None, f"unrecognised row layout (keys: {', '.join(sorted(keys))})")


_PKU_TEXT = ("prompt", "dialogue_history", "response_0", "response_1")


def _pku_text(row: dict, path: Any, line: int) -> tuple[Prompt, list[str]]:
    """A PKU row's prompt (the whole conversation when `dialogue_history` has earlier turns) and its two responses."""
    prompt: Prompt = read_str(row, "prompt", path, line)
    history = row.get("dialogue_history")
    if isinstance(history, str) and history.strip():
        try:
            messages = parse_hh_transcript(history)
        except ValueError as e:
            raise DataError(path, line, "dialogue_history", str(e)) from None
        if sum(m["role"] == "user" for m in messages) > 1:
            prompt = _as_prompt(messages, path, line, "dialogue_history")
    return prompt, [read_str(row, f"response_{i}", path, line) for i in (0, 1)]


def _response_id(row: dict, key: str, path: Any, line: int) -> int:
    """A PKU row's `better_response_id` or `safer_response_id`: 0 or 1."""
    value = _int(row.get(key), path, line, key, "0 or 1")
    if value not in (0, 1):
        raise DataError(path, line, key, f"expected 0 or 1, got {value!r}")
    return value


def _pku(row: dict, path: Any, line: int, src: str):
    prompt, responses = _pku_text(row, path, line)
    sid = _response_id(row, "safer_response_id", path, line)
    meta = {k: v for k, v in row.items() if k not in _PKU_TEXT}
    pairs = [PreferencePair(prompt, responses[sid], responses[1 - sid], src, meta)]
    labelled = []
    for i in (0, 1):
        key = f"is_response_{i}_safe"
        value = _bool_or_none(row.get(key), path, line, key)
        if value is not None:
            labelled.append(LabelledResponse(prompt, responses[i], value, src, {**meta, "response_id": i}))
    return pairs, labelled


def _split_conversations(chosen: list[dict], rejected: list[dict], path: Any, line: int):
    """(prompt, chosen, rejected) from two full conversations; None if they differ before the last turn."""
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant" or len(conv) < 2:
            raise DataError(path, line, key, "expected prompt turns followed by a final assistant turn")
    if chosen[:-1] != rejected[:-1]:
        return None
    return _as_prompt(chosen[:-1], path, line, "chosen"), chosen[-1]["content"], rejected[-1]["content"]


def _hh(row: dict, path: Any, line: int, src: str):
    convs = []
    for key in ("chosen", "rejected"):
        try:
            convs.append(parse_hh_transcript(read_str(row, key, path, line), drop_empty_last=False))
        except ValueError as e:
            raise DataError(path, line, key, str(e)) from None
    split = _split_conversations(*convs, path, line)
    if split is None:  # a handful of real HH rows (5 in harmless-base test) diverge earlier
        log.warning("skipping %s: chosen and rejected transcripts differ before the last turn", src)
        return [], []
    return [PreferencePair(*split, src, {})], []


def _trl_response(value: Any, path: Any, line: int, key: str) -> str:
    if isinstance(value, str):
        return value
    messages = _messages(value, path, line, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(path, line, key, "expected a string or a list with one assistant message")
    return messages[0]["content"]


def _trl(row: dict, path: Any, line: int, src: str):
    meta = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    if "prompt" not in row:  # TRL's implicit-prompt form: full conversations sharing a prefix
        chosen, rejected = (_messages(row.get(k), path, line, k) for k in ("chosen", "rejected"))
        split = _split_conversations(chosen, rejected, path, line)
        if split is None:
            raise DataError(path, line, "rejected", "chosen and rejected do not share the prompt turns")
        return [PreferencePair(*split, src, meta)], []
    prompt = read_prompt(row, "prompt", path, line)
    c, r = (_trl_response(row.get(k), path, line, k) for k in ("chosen", "rejected"))
    return [PreferencePair(prompt, c, r, src, meta)], []


def _labelled(row: dict, path: Any, line: int, src: str):
    key = _first_present(row, LABEL_FIELDS)
    if key is None:
        raise DataError(path, line, "label", "missing")
    safe = _label(row[key], path, line, key)
    meta = {k: v for k, v in row.items() if k not in ("prompt", "response", key)}
    prompt, response = read_prompt(row, "prompt", path, line), read_str(row, "response", path, line)
    return [], [LabelledResponse(prompt, response, safe, src, meta)]


def _answer_labels(row: dict, path: Any, line: int, src: str):
    """data/rbrm_labels rows: a model's answer with `unsafe` judged on harmful prompts. Rows of benign prompts
    carry a helpfulness label instead, so they give no safety example."""
    if _bool_or_none(row["benign"], path, line, "benign"):
        return [], []
    unsafe = _bool_or_none(row["unsafe"], path, line, "unsafe")
    if unsafe is None:
        raise DataError(path, line, "unsafe", "missing on a harmful prompt")
    meta = {k: v for k, v in row.items() if k not in ("prompt", "response", "unsafe")}
    return [], [LabelledResponse(read_prompt(row, "prompt", path, line), read_str(row, "response", path, line), not unsafe,
                                 src, meta)]


def _paper_pairs(path: Any) -> Iterator[tuple[list, list]]:
    """One pair per prompt: the best-scored response over the worst (the paper's re-ranking)."""
    groups: dict[str, list[ScoredSample]] = {}
    for line, s in _iter_scored(path):
        if s.score is None:
            raise DataError(path, line, "score", "missing (needed to rank)")
        groups.setdefault(s.prompt_id, []).append(s)
    for group in groups.values():
        best = max(group, key=lambda s: s.score)
        worst = min(group, key=lambda s: s.score)
        if best.score == worst.score or len({s.response for s in group}) < 2 or best.response == worst.response:
            continue
        meta = {"chosen_score": best.score, "rejected_score": worst.score, "n_samples": len(group),
                "chosen_index": best.index, "rejected_index": worst.index}
        yield [PreferencePair(best.prompt, best.response, worst.response, group[0].source, meta)], []


_ROW_PARSERS: dict[str, Callable] = {"pku": _pku, "hh": _hh, "trl": _trl, "labelled": _labelled,
                                     "answer_labels": _answer_labels}


def _iter_examples(path: Any, format: str) -> Iterator[tuple[list, list]]:
    """(pairs, labelled) per row, or per prompt for the paper's sample files; lazily, so limits stop early."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    records = iter_records(path)
    first = next(records, None)
    if first is None:
        raise DataError(path, None, None, "empty file")
    fmt = detect_format(first[1], path, first[0]) if format == "auto" else format
    if fmt == "prompts":
        raise DataError(path, first[0], None, "holds prompts only (no responses); use load_prompts")
    if fmt == "paper_samples":
        records.close()
        yield from _paper_pairs(path)
        return
    parse = _ROW_PARSERS[fmt]
    for line, row in itertools.chain([first], records):
        pairs, labelled = parse(row, path, line, f"{os.fspath(path)}:{line}")
        if any(not (p.chosen.strip() and p.rejected.strip()) for p in pairs):
            log.warning("skipping the pair at %s:%d: an empty response", os.fspath(path), line)
            pairs = []
        if any(not item.response.strip() for item in labelled):  # an empty answer teaches the probe nothing
            log.warning("skipping an empty labelled response at %s:%d", os.fspath(path), line)
            labelled = [item for item in labelled if item.response.strip()]
        yield pairs, labelled


def load_examples(path: Any, format: str = "auto",
                  limit: int | None = None) -> tuple[list[PreferencePair], list[LabelledResponse]]:
    """Pairs and labelled responses from one file; `limit` caps the rows read (prompts for sample files)."""
    pairs: list[PreferencePair] = []
    labelled: list[LabelledResponse] = []
    for n, (p, lab) in enumerate(_iter_examples(path, format)):
        if limit is not None and n >= limit:
            break
        pairs += p
        labelled += lab
    return pairs, labelled


def _collect(path: Any, format: str, limit: int | None, which: int, what: str) -> list:
    out: list = []
    for item in _iter_examples(path, format):
        out += item[which]
        if limit is not None and len(out) >= limit:
            return out[:limit]
    if not out:
        raise DataError(path, None, None, f"no {what} in this file")
    return out


def load_pairs(path: Any, format: str = "auto", limit: int | None = None) -> list[PreferencePair]:
    return _collect(path, format, limit, 0, "preference pairs")


def load_labelled(path: Any, format: str = "auto", limit: int | None = None) -> list[LabelledResponse]:
    return _collect(path, format, limit, 1, "safety-labelled responses (all labels null?)")


SAFETY_LABEL_KEYS = ("is_response_0_safe", "is_response_1_safe")


def _safety_labelled(row: dict, path: Any, line: int) -> SafetyLabelledPair:
    prompt, responses = _pku_text(row, path, line)
    better = _response_id(row, "better_response_id", path, line)
    safe = []
    for key in SAFETY_LABEL_KEYS:
        value = _bool_or_none(row.get(key), path, line, key)
        if value is None:
            raise DataError(path, line, key, "missing: every response needs a safety label (true = safe) here")
        safe.append(value)
    meta = {k: v for k, v in row.items() if k not in _PKU_TEXT}
    return SafetyLabelledPair(prompt, responses[better], responses[1 - better], safe[better], safe[1 - better],
                              f"{os.fspath(path)}:{line}", meta)


def load_safety_labelled_pairs(path: Any, limit: int | None = None) -> list[SafetyLabelledPair]:
    """PKU-SafeRLHF rows as (more helpful, less helpful) pairs with both responses' safety labels, which must all
    be present: a pair with a missing label cannot be placed by a safety constraint, so it is an error, not a skip.
    Rows with an empty response are skipped with a warning, as `load_pairs` does."""
    out: list[SafetyLabelledPair] = []
    for line, row in iter_records(path):
        if limit is not None and len(out) >= limit:
            break
        if not out and detect_format(row, path, line) != "pku":
            raise DataError(path, line, None, "expected PKU-SafeRLHF rows (prompt, response_0, response_1, "
                                              "better_response_id, is_response_0_safe, is_response_1_safe)")
        pair = _safety_labelled(row, path, line)
        if not (pair.chosen.strip() and pair.rejected.strip()):
            log.warning("skipping the pair at %s:%d: an empty response", os.fspath(path), line)
            continue
        out.append(pair)
    if not out:
        raise DataError(path, None, None, "no safety-labelled preference pairs in this file")
    return out


# ---------------------------------------------------------------- prompts and samples

def prompt_records(prompts: Iterable) -> list:
    """Prompts for generation: records (anything with `id` and `prompt`) as they are, and a bare prompt (a string
    or a list of chat messages) as a `PromptRecord` with its position as id."""
    return [PromptRecord(str(i), p, source=f"prompts[{i}]") if isinstance(p, (str, list)) else p
            for i, p in enumerate(prompts)]


def load_prompts(path: Any, prompt_field: str | None = None, limit: int | None = None,
                 category_field: str | None = None, where: dict[str, str] | None = None) -> list[PromptRecord]:
    """Prompts from any of the bundled evaluation sets; `where` keeps rows whose fields equal the values."""
    out: list[PromptRecord] = []
    seen_rows = 0
    for n, (line, value) in enumerate(iter_values(path)):
        seen_rows += 1
        row = {"prompt": value} if isinstance(value, str) else value
        if not isinstance(row, dict):
            raise DataError(path, line, None, f"expected an object or a string, got {type(value).__name__}")
        if n == 0:
            prompt_field = prompt_field or _first_present(row, PROMPT_FIELDS)
            if prompt_field is None:
                raise DataError(path, line, None, f"no prompt field; expected one of {', '.join(PROMPT_FIELDS)}")
            category_field = category_field or _first_present(row, CATEGORY_FIELDS)
        for key in where or {}:
            if key not in row:
                raise DataError(path, line, key, "missing (needed by `where`)")
        if any(str(row[k]) != str(v) for k, v in (where or {}).items()):
            continue
        prompt = read_prompt(row, prompt_field, path, line)
        if isinstance(prompt, str):
            prompt = unwrap_paper_prompt(prompt)
            if not prompt.strip():  # the paper's own prompt list has one
                log.warning("%s:%s: skipping an empty prompt", os.fspath(path), line)
                continue
        if category_field is not None and category_field not in row:
            raise DataError(path, line, category_field, "missing")
        category = row.get(category_field) if category_field else None
        id_field = _first_present(row, ID_FIELDS)
        rid = row.get(id_field) if id_field else None
        meta = {k: v for k, v in row.items() if k not in (prompt_field, category_field, id_field)}
        out.append(PromptRecord(str(n) if rid in (None, "") else str(rid), prompt,
                                None if category in (None, "") else str(category),
                                f"{os.fspath(path)}:{line}", meta))
        if limit is not None and len(out) >= limit:
            break
    if not seen_rows:
        raise DataError(path, None, None, "empty file")
    if not out and limit != 0:
        raise DataError(path, None, None, "no prompts" + (f" match where={where!r}" if where else ""))
    return out


def _iter_scored(path: Any) -> Iterator[tuple[int, ScoredSample]]:
    counts: dict[str, int] = {}
    for line, row in iter_records(path):
        if "input" in row and "output" in row:
            prompt: Prompt = unwrap_paper_prompt(read_str(row, "input", path, line))
            response, index_key, used = read_str(row, "output", path, line), "idx", ("input", "output", "idx", "score")
        else:
            prompt = read_prompt(row, "prompt", path, line)
            index_key = next((k for k in ("sample_index", "index", "idx") if k in row), "index")
            response = read_str(row, "response", path, line)
            used = ("prompt", "response", index_key, "score", "prompt_id")
        pid = row.get("prompt_id")
        pid = str(pid) if isinstance(pid, (str, int)) and not isinstance(pid, bool) else prompt_key(prompt)
        index = _int(row.get(index_key, counts.get(pid, 0)), path, line, index_key)
        counts[pid] = counts.get(pid, 0) + 1
        score = _float(row.get("score"), path, line, "score")
        meta = {k: v for k, v in row.items() if k not in used}
        yield line, ScoredSample(prompt, response, score, index, pid, f"{os.fspath(path)}:{line}", meta)


def load_scored_samples(path: Any, limit: int | None = None) -> list[ScoredSample]:
    """The paper's (idx, input, output, score) rows, or our own (prompt, response[, score, index]) rows."""
    out: list[ScoredSample] = []
    for _, sample in _iter_scored(path):
        if limit is not None and len(out) >= limit:
            break
        out.append(sample)
    if not out and limit != 0:
        raise DataError(path, None, None, "empty file")
    return out
