"""Reading the safety data sets and writing our own outputs, with errors that point at the bad row.

Every loader turns a file into plain dataclasses whose `prompt` is a `render.Prompt`, so the rest of the
pipeline never sees a data set's own layout. Writers are atomic or append-and-fsync so that a killed
stage never leaves a file that a resumed run would misread.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import OutputLockedError, RbrmError
from .render import Prompt, prompt_key

log = logging.getLogger(__name__)

REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # the datasets shipped in the repository, with licences
FORMATS = ("pku", "hh", "trl", "paper_samples", "labelled", "answer_labels", "prompts")
PROMPT_FIELDS = ("prompt", "question", "instruction", "goal", "Behavior", "behavior", "input", "text")
CATEGORY_FIELDS = ("category", "1-category", "SemanticCategory", "type", "risk_area")
ID_FIELDS = ("id", "qid", "BehaviorID")
LABEL_FIELDS = ("label", "safe", "is_safe")


class DataError(RbrmError, ValueError):
    """A bad input file; the message names the file, the row (line, csv line or .json element) and the field."""

    def __init__(self, path: Any, line: int | None, field: str | None, message: str, *,
                 element: bool | None = None):
        self.path, self.line, self.field = os.fspath(path), line, field
        if element is None:  # rows of a .json array are numbered by element (0-based), others by line
            element = self.path.removesuffix(".gz").endswith(".json")
        where = self.path
        if line is not None:
            where += f" element {line}" if element else f":{line}"
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + message)


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


# ---------------------------------------------------------------- reading rows

def check_input_file(path: Any) -> str:
    """The path as a string, or a DataError naming it when it is missing or not a file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(path, None, None, "file not found")
    if not os.path.isfile(path):
        raise DataError(path, None, None, "is a directory (or another non-file); expected a file")
    return path


def _open_text(path: str):
    check_input_file(path)
    # utf-8-sig: spreadsheet-exported csv files often start with a BOM
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _not_utf8(path: str) -> DataError:
    """Where the first byte that is not UTF-8 sits (text line and column), for a file that failed to decode."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
        return DataError(path, None, None, "not UTF-8 text")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        return DataError(path, line, None, f"not UTF-8 text: byte 0x{raw[err.start]:02x} at column {column}; "
                                           "re-save the file as UTF-8", element=False)


@contextmanager
def _utf8_errors(path: str) -> Iterator[None]:
    """Turn a decoding error anywhere in a read into a DataError with the file, line and column."""
    try:
        yield
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def read_json_file(path: Any) -> Any:
    """A whole JSON file (a config, a sidecar); every failure is a DataError that names the file."""
    path = os.fspath(path)
    with _utf8_errors(path), _open_text(path) as f:
        return _loads(f.read(), path, None)


def _iter_values(path: Any) -> Iterator[tuple[int, Any]]:
    """(line, value) for any JSON value, so that prompt lists may hold plain strings."""
    path = os.fspath(path)
    kind = path.removesuffix(".gz").rsplit(".", 1)[-1].lower()
    if kind not in ("jsonl", "json", "csv"):
        raise DataError(path, None, None, "unknown extension; expected .jsonl, .json or .csv (optionally .gz)")
    with _utf8_errors(path), _open_text(path) as f:
        if kind == "jsonl":
            for n, text in enumerate(f, 1):
                if text.strip():
                    yield n, _loads(text, path, n)
        elif kind == "json":
            data = _loads(f.read(), path, None)
            if not isinstance(data, list):
                raise DataError(path, None, None, f"expected a JSON array of rows, got {type(data).__name__}")
            yield from enumerate(data)
        else:
            yield from _iter_csv(f, path)


def _loads(text: str, path: str, line: int | None) -> Any:
    if line is not None:  # one jsonl row: without its newline, a cut-off row reports its own column, not "column 1"
        text = text.rstrip("\r\n")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = line if line is not None else e.lineno  # a whole .json file: report its text line
        raise DataError(path, where, None, f"malformed JSON: {e.msg} (column {e.colno})", element=False) from None


def _iter_csv(f: io.TextIOBase, path: str) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(f)
    # PyRIT's files start with a "# dataset_version" line before the header
    header = next((row for row in reader if row and not row[0].startswith("#")), None)
    while header is not None:
        start = reader.line_num + 1
        row = next(reader, None)
        if row is None:
            return
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(path, start, None, f"expected {len(header)} csv columns, got {len(row)}")
        yield start, dict(zip(header, row))


def iter_records(path: Any) -> Iterator[tuple[int, dict]]:
    """(line number, row) for .jsonl / .json / .csv (optionally .gz); .json rows are numbered by element."""
    for line, value in _iter_values(path):
        if not isinstance(value, dict):
            raise DataError(path, line, None, f"expected a JSON object, got {type(value).__name__}")
        yield line, value


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


def _pku(row: dict, path: Any, line: int, src: str):
    prompt: Prompt = read_str(row, "prompt", path, line)
    history = row.get("dialogue_history")
    if isinstance(history, str) and history.strip():
        try:
            messages = parse_hh_transcript(history)
        except ValueError as e:
            raise DataError(path, line, "dialogue_history", str(e)) from None
        if sum(m["role"] == "user" for m in messages) > 1:
            prompt = _as_prompt(messages, path, line, "dialogue_history")
    responses = [read_str(row, f"response_{i}", path, line) for i in (0, 1)]
    sid = _int(row.get("safer_response_id"), path, line, "safer_response_id", "0 or 1")
    if sid not in (0, 1):
        raise DataError(path, line, "safer_response_id", f"expected 0 or 1, got {sid!r}")
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


# ---------------------------------------------------------------- prompts and samples

def load_prompts(path: Any, prompt_field: str | None = None, limit: int | None = None,
                 category_field: str | None = None, where: dict[str, str] | None = None) -> list[PromptRecord]:
    """Prompts from any of the bundled evaluation sets; `where` keeps rows whose fields equal the values."""
    out: list[PromptRecord] = []
    seen_rows = 0
    for n, (line, value) in enumerate(_iter_values(path)):
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


def cache_dir() -> Path:
    """The user cache (XDG) of converted models and per-machine measurements; `RBRM_CACHE` overrides it."""
    root = os.environ.get("RBRM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rbrm"
    )
    return Path(root)


# ---------------------------------------------------------------- writing

@contextmanager
def atomic_path(path: Any) -> Iterator[Path]:
    """A sibling temp path to write into; it replaces `path` on success and is removed on failure, so
    readers see the old file or the new one, never half of one. The suffix is kept (savefig reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Any) -> Iterator[Path]:
    """`atomic_path` for a folder: fill the yielded temp folder; it replaces `path` (old folder and all) on
    success and is removed on failure, so a half-written folder is never used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Any, write: Callable[[io.TextIOBase], None]) -> None:
    """Write a text file through `write(f)` into a temporary file, synced, then moved over `path`."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: keep the umask's usual mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def _line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: Any, rows: Iterable[dict]) -> None:
    write_text_atomic(path, lambda f: f.writelines(_line(r) for r in rows))


def write_json(path: Any, obj: Any) -> None:
    write_text_atomic(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n"))


def _drop_partial_tail(path: Path) -> None:
    """Cut a last line that a killed writer left without its newline, so new rows start on a clean line."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            if pos == end and chunk.endswith(b"\n"):
                return
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                pos = pos - step + cut + 1
                break
            pos -= step
        f.seek(pos)
        try:  # a whole row that merely lacks its newline is kept
            json.loads(f.read())
            f.write(b"\n")
        except ValueError:
            log.warning("%s: dropping a truncated last line (%d bytes) before appending", path, end - pos)
            f.truncate(pos)


@contextmanager
def exclusive_writer(path: Any) -> Iterator[None]:
    """Hold `<path>.lock` while appending to `path`: a second writer gets an error instead of doubling the rows.

    The lock is an OS file lock (filelock), so a killed writer releases it and a rerun resumes at once.
    """
    lock_path = os.fspath(path) + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputLockedError(f"{os.fspath(path)}: another process is writing this file (it holds {lock_path}); "
                                "wait for it to finish, or write to another file") from None
    try:
        yield
    finally:
        lock.release()


def append_jsonl(path: Any, rows: Iterable[dict]) -> None:
    """Append rows and fsync, so a resumed stage keeps every row written before a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        _drop_partial_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(_line(row))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Any) -> list[dict]:
    """Rows of a jsonl file; a malformed last line (a killed writer) is skipped with a warning."""
    path = os.fspath(path)
    with _utf8_errors(path), _open_text(path) as f:
        lines = [(n, text) for n, text in enumerate(f, 1) if text.strip()]
    rows = []
    for i, (n, text) in enumerate(lines):
        try:
            row = _loads(text, path, n)
        except DataError:
            if i < len(lines) - 1:
                raise
            log.warning("%s:%d: skipping a truncated last line", path, n)
            continue
        if not isinstance(row, dict):
            raise DataError(path, n, None, f"expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows
