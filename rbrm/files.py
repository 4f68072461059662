"""rbrm's own files: atomic and locked writes, jsonl that survives a killed writer, rows read with errors that
point at the bad line, and the one identity hash (`digest`).

Writers are atomic or append-and-fsync so that a killed stage never leaves a file that a resumed run would
misread. The external data sets' layouts are `rbrm.formats`; this module knows no data set.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import DataError, OutputLockedError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- identity


def digest(data: bytes | str, chars: int | None = 16) -> str:
    """The first `chars` hex digits (all 64 with None) of the SHA-256 of `data` (a str as UTF-8).

    rbrm's one identity hash: stage keys, sidecars and caches store these values, so the recipe never changes
    (tests/test_files.py pins it); a change would silently invalidate every cached run.
    """
    h = hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()
    return h if chars is None else h[:chars]


def json_digest(obj: Any, chars: int | None = 16) -> str:
    """`digest` of `obj` as sorted-key JSON (anything JSON cannot write goes in as its `str`)."""
    return digest(json.dumps(obj, sort_keys=True, default=str), chars)


def file_digest(path: str | os.PathLike, chars: int | None = 16) -> str:
    """`digest` of a file's bytes, read in blocks so a large weights file is never held whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() if chars is None else h.hexdigest()[:chars]


def cache_dir() -> Path:
    """The user cache (XDG) of converted models and per-machine measurements; `RBRM_CACHE` overrides it."""
    root = os.environ.get("RBRM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rbrm"
    )
    return Path(root)


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


def iter_values(path: Any) -> Iterator[tuple[int, Any]]:
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
    for line, value in iter_values(path):
        if not isinstance(value, dict):
            raise DataError(path, line, None, f"expected a JSON object, got {type(value).__name__}")
        yield line, value



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
