"""Prompt sets: `[NAME=]PATH[:OPTIONS]` specs, XSTest's over-refusal set, and where each set's files go."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import DataError
from ..formats import REPO_DATA_DIR, load_prompts

XSTEST_PROMPTS = REPO_DATA_DIR / "xstest" / "xstest_prompts.csv"
OVER_REFUSAL_SET = "xstest_safe"
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass
class PromptSet:
    name: str
    path: str
    benign: bool = False
    where: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    category_field: str | None = None
    prompt_field: str | None = None


def parse_where(items: Sequence[str] | None, what: str = "--where") -> dict[str, str]:
    """`FIELD=VALUE` strings as a dict (values compare as strings, as `load_prompts` does)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: expected FIELD=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def check_limit(limit: int | None, what: str) -> int | None:
    if limit is not None and limit < 1:
        raise ValueError(f"{what}: the limit must be a positive number of prompts, got {limit}")
    return limit


def _set_name_from_path(path: str) -> str:
    name = os.path.basename(path.removesuffix(".gz"))
    return name.rsplit(".", 1)[0] if "." in name else name


def parse_prompt_set(spec: str, where: dict[str, str] | None = None, limit: int | None = None,
                     prompt_field: str | None = None, category_field: str | None = None) -> PromptSet:
    """One `[NAME=]PATH[:OPTIONS]` spec (see the module docstring); `where`/`limit` are the global defaults."""
    body, options = spec, ""
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        items = [t.strip() for t in tail.split(",")]
        if items and all(t == "benign" or ("=" in t and t.split("=", 1)[0].strip()) for t in items):
            body, options = head, tail
    if "=" in body and not os.path.exists(body):
        name, path = (s.strip() for s in body.split("=", 1))
    else:
        name, path = _set_name_from_path(body), body
    if not path:
        raise ValueError(f"--prompts {spec!r}: no file given")
    if not _SET_NAME.fullmatch(name):
        raise ValueError(f"--prompts {spec!r}: set name {name!r} must be letters, digits, '_', '.', '+' or '-' "
                         "(it names a folder); give one as NAME=PATH")
    pset = PromptSet(name, path, where=dict(where or {}), limit=limit, prompt_field=prompt_field,
                     category_field=category_field)
    for item in (t.strip() for t in options.split(",") if t.strip()):
        if item == "benign":
            pset.benign = True
        elif item.startswith("limit="):
            try:
                pset.limit = int(item.removeprefix("limit="))
            except ValueError:
                raise ValueError(f"--prompts {spec!r}: limit must be an integer, got {item!r}") from None
        else:
            pset.where.update(parse_where([item], f"--prompts {spec!r}"))
    check_limit(pset.limit, f"--prompts {spec!r}")
    return pset


def over_refusal_set(limit: int | None = None) -> PromptSet:
    """XSTest's 250 safe prompts that merely look unsafe: refusing them is over-refusal."""
    return PromptSet(OVER_REFUSAL_SET, str(XSTEST_PROMPTS), benign=True, where={"label": "safe"}, limit=limit)


def set_dir(out_dir: str | os.PathLike, pset: PromptSet, several: bool) -> str:
    return os.path.join(out_dir, pset.name) if several else os.fspath(out_dir)


def load_set(pset: PromptSet) -> list:
    if not os.path.exists(pset.path):
        raise DataError(pset.path, None, None, f"file not found (prompt set {pset.name!r})")
    return load_prompts(pset.path, prompt_field=pset.prompt_field, limit=pset.limit,
                        category_field=pset.category_field, where=pset.where or None)
