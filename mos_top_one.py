"""The paper's `mos_top_one.py` command line, run on `rbrm rerank` (same flags, plus `--reject_path`).

    python mos_top_one.py --data_path samples.jsonl --model_path MODEL --mos_path RM_DIR \
        --accept_path chosen.jsonl [--reject_path rejected.jsonl] --dim 576

`--data_path` is a samples file in the paper's layout (idx, input, output, score) or `rbrm sample`'s; every
sample is re-scored by the hybrid reward on the model's hidden states (scores in the file are ignored).
`--dim` is only checked against the model's hidden size (the paper hard-coded sizes from it).
The paper computed the rejected set but never wrote it; here it goes to `--reject_path`.
"""

from __future__ import annotations

import argparse
import os


def default_reject_path(accept_path: str) -> str:
    folder, name = os.path.split(accept_path)
    if "chosen" in name:
        return os.path.join(folder, name.replace("chosen", "rejected"))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f"{stem}.rejected{ext or '.jsonl'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True, help="sampled responses (.jsonl)")
    parser.add_argument("--model_path", required=True, help="the policy: alias, folder, .gguf or hub id")
    parser.add_argument("--mos_path", required=True, help="hybrid reward model directory")
    parser.add_argument("--accept_path", required=True, help="output: chosen responses (idx, input, output, score)")
    parser.add_argument("--reject_path", default=None, help="output: rejected responses (default: next to accept)")
    parser.add_argument("--dim", type=int, default=None, help="model hidden size, checked against the model")
    parser.add_argument("--top_k", type=int, default=1, help="pairs per prompt (i-th best vs i-th worst)")
    parser.add_argument("--alpha", type=float, default=7.5, help="confidence = sigmoid(alpha x score gap)")
    parser.add_argument("--out_dir", default=None, help="also write rank/pairs/summary (as `rbrm rerank`) here")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from rbrm.data import write_jsonl
    from rbrm.errors import RbrmError
    from rbrm.rerank import chosen_rows, format_summary, rejected_rows, rerank_file, write_rerank_outputs

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
