"""Judging rows once: judgments cached per response and judge version, so a rerun judges only what is new."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ..files import append_jsonl, digest, exclusive_writer, read_jsonl, write_jsonl
from ..render import prompt_key

log = logging.getLogger(__name__)

JUDGE_CHUNK = 64  # rows judged between two appends to the judgment cache


# Judges take text: `prompt_key` flattens a conversation with its roles, so the judge keeps the context.
def judge_rows(rows: Sequence[dict], judge, cache_path: str | os.PathLike | None = None,
               chunk: int = JUDGE_CHUNK, progress: bool = False) -> list[dict]:
    """One judgment per row (`unsafe`, `score`, `refusal`, maybe `judge_category`/`judge_raw`).

    With `cache_path`, judgments are appended after every chunk, keyed by (prompt_id, sample_index, response
    hash) and the judge's name and version, so a rerun judges only what is new (a guard model is slow).
    """
    with exclusive_writer(cache_path) if cache_path is not None else contextlib.nullcontext():
        return _judge_rows(rows, judge, cache_path, chunk, progress)


def _judge_rows(rows: Sequence[dict], judge, cache_path, chunk: int, progress: bool) -> list[dict]:
    def key(pid: Any, index: Any, sha: str) -> tuple[str, int, str]:
        return str(pid), int(index), sha

    cached: dict[tuple[str, int, str], dict] = {}
    if cache_path is not None and os.path.exists(cache_path):
        old = read_jsonl(cache_path)
        kept = [r for r in old if r.get("judge") == judge.name and r.get("judge_version") == judge.version]
        for r in kept:
            cached[key(r["prompt_id"], r["sample_index"], r["response_sha256"])] = r
        if len(kept) < len(old):  # another version of this judge wrote them: they no longer count
            log.info("%s: dropping %d judgments by another judge version", cache_path, len(old) - len(kept))
            write_jsonl(cache_path, kept)
    keys = [key(r["prompt_id"], r.get("sample_index", 0), digest(r["response"])) for r in rows]
    todo = [i for i, k in enumerate(keys) if k not in cached]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="judge", unit="row", disable=not progress)
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        results = judge.judge([prompt_key(rows[i]["prompt"]) for i in idx], [rows[i]["response"] for i in idx])
        new = []
        for i, res in zip(idx, results):
            record = {"prompt_id": keys[i][0], "sample_index": keys[i][1], "response_sha256": keys[i][2],
                      "judge": judge.name, "judge_version": judge.version, "unsafe": bool(res.unsafe),
                      "score": float(res.score), "refusal": bool(res.refusal)}
            if res.category is not None:
                record["judge_category"] = res.category
            if res.raw is not None:
                record["judge_raw"] = res.raw
            new.append(record)
            cached[keys[i]] = record
        if cache_path is not None:
            append_jsonl(cache_path, new)
        bar.update(len(idx))
    bar.close()
    fields = ("unsafe", "score", "refusal", "judge_category", "judge_raw")
    return [{f: cached[k][f] for f in fields if f in cached[k]} for k in keys]


def judge_cache_path(set_dir: str | os.PathLike, judge) -> str:
    return os.path.join(set_dir, f"judgments.{judge.name}.jsonl")


