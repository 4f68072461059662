"""The paper's `mos_top_one.py` command line, run on `rbrm rerank` (same flags, plus `--reject_path`).

    python mos_top_one.py --data_path samples.jsonl --model_path MODEL --mos_path RM_DIR \
        --accept_path chosen.jsonl [--reject_path rejected.jsonl] --dim 576

`--data_path` is a samples file in the paper's layout (idx, input, output, score) or `rbrm sample`'s; every
sample is re-scored by the hybrid reward on the model's hidden states (scores in the file are ignored).
`--dim` is only checked against the model's hidden size (the paper hard-coded sizes from it).
The paper computed the rejected set but never wrote it; here it goes to `--reject_path`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from rbrm.errors import RbrmError
from rbrm.files import write_jsonl
from rbrm.rerank import (
    PAPER_ALPHA,
    chosen_rows,
    format_summary,
    rejected_rows,
    rerank_file,
    write_rerank_outputs,
)


@dataclass
class MosTopOneConfig:
    data_path: str = field(metadata={"help": "sampled responses (.jsonl)"})
    model_path: str = field(metadata={"help": "the policy: alias, folder, .gguf or hub id"})
    mos_path: str = field(metadata={"help": "hybrid reward model directory"})
    accept_path: str = field(metadata={"help": "output: chosen responses (idx, input, output, score)"})
    reject_path: str | None = field(default=None, metadata={
        "help": "output: rejected responses (default: next to accept)"})
    dim: int | None = field(default=None, metadata={"help": "model hidden size, checked against the model"})
    top_k: int = field(default=1, metadata={"help": "pairs per prompt (i-th best vs i-th worst)"})
    alpha: float = field(default=PAPER_ALPHA, metadata={"help": "confidence = sigmoid(alpha x score gap)"})
    out_dir: str | None = field(default=None, metadata={
        "help": "also write rank/pairs/summary (as `rbrm rerank --out`) here"})
    dtype: str = "auto"
    device: str | None = None


def default_reject_path(accept_path: str) -> str:
    folder, name = os.path.split(accept_path)
    if "chosen" in name:
        return os.path.join(folder, name.replace("chosen", "rejected"))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f"{stem}.rejected{ext or '.jsonl'}")


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(MosTopOneConfig, description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)

    try:
        result = rerank_file(args.model_path, args.mos_path, args.data_path, top_k=args.top_k, alpha=args.alpha,
                             dtype=args.dtype, device=args.device, dim=args.dim)
    except RbrmError as err:  # a bad file, model or --dim: one message, not a traceback
        raise SystemExit(f"mos_top_one.py: {err}") from None
    reject_path = args.reject_path or default_reject_path(args.accept_path)
    write_jsonl(args.accept_path, chosen_rows(result))
    write_jsonl(reject_path, rejected_rows(result))
    if args.out_dir:
        write_rerank_outputs(result, args.out_dir, args.alpha)
    print(format_summary(result.summary))
    print(f"wrote {args.accept_path} and {reject_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
