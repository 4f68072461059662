"""Does fine-tuning the encoder beat linear heads on frozen features? A LoRA-tuned MiniLM cross-encoder as a judge.

The packaged all-MiniLM-L6-v2 reads (prompt, response) as one input and is tuned with LoRA (the classifier head in
full) on some labelled sources, then tested on another, with the splits of `scripts/judge_features_study.py`:

    python scripts/judge_finetune_study.py --split 1 --bf16            # XSTest + Salad + SmolLM2 dev -> check

Every (source, class) cell gets the same weight in the loss; at most `--max-per-cell` training rows per cell. A
quarter of the SmolLM2 dev prompts (all their answers) is held out to choose the threshold after each epoch; the
test source chooses nothing. Prints, per epoch, the test agreement at logit 0 and at the validation threshold.
Results: docs/evaluation.md, "A fine-tuned cross-encoder, measured".
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_features_study import SPLITS, labelled_rows  # noqa: E402

from rbrm.judges import binary_metrics, minilm_path  # noqa: E402


def weights_for(sources, y):
    """Per-row weights, mean 1, under which every (source, class) cell weighs the same."""
    cells = list(zip(sources, y))
    counts = Counter(cells)
    w = np.array([1.0 / counts[k] for k in cells])
    return w / w.mean()


def batches(idx, lengths, batch_size, rng):
    """Shuffled batches of similar lengths (sorted within chunks of 50 batches), so padding stays small."""
    idx = np.array(idx)
    rng.shuffle(idx)
    chunk = batch_size * 50
    out = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: lengths[i])
        out += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def encode(tok, rows, max_length):
    enc = tok([r["prompt"] for r in rows], [r["response"] for r in rows], truncation="longest_first",
              max_length=max_length)
    return enc["input_ids"], enc["token_type_ids"]


def collate(ids, tts, sel, pad):
    n = max(len(ids[i]) for i in sel)
    x = torch.full((len(sel), n), pad)
    t = torch.zeros((len(sel), n), dtype=torch.long)
    m = torch.zeros((len(sel), n), dtype=torch.long)
    for k, i in enumerate(sel):
        x[k, :len(ids[i])] = torch.tensor(ids[i])
        t[k, :len(ids[i])] = torch.tensor(tts[i])
        m[k, :len(ids[i])] = 1
    return x, t, m


@torch.no_grad()
def predict(model, ids, tts, sel, pad, bs=64):
    model.eval()
    order = sorted(sel, key=lambda i: len(ids[i]))
    out = {}
    for j in range(0, len(order), bs):
        b = order[j:j + bs]
        x, t, m = collate(ids, tts, b, pad)
        logits = model(input_ids=x, token_type_ids=t, attention_mask=m).logits[:, 0]
        for i, v in zip(b, logits.float().tolist()):
            out[i] = v
    return np.array([out[i] for i in sel])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="unsafe")
    ap.add_argument("--split", type=int, nargs="+", default=[1], help="indices into judge_features_study.SPLITS")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--limit", type=int, default=None, help="rows per side, for a quick smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--max-per-cell", type=int, default=600, help="training rows kept per (source, class)")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    rows = labelled_rows(args.task)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    ids, tts = encode(tok, rows, args.max_length)
    lengths = [len(i) for i in ids]
    y = np.array([r["y"] for r in rows])
    sources = np.array([r["source"] for r in rows])
    for s in args.split:
        train, test = SPLITS[args.task][s]
        tr = np.flatnonzero(np.isin(sources, train))
        te = np.flatnonzero(sources == test)
        keep = []
        rng1 = np.random.default_rng(1)
        for cell in sorted(set(zip(sources[tr], y[tr]))):
            members = tr[(sources[tr] == cell[0]) & (y[tr] == cell[1])]
            keep += list(rng1.choice(members, min(len(members), args.max_per_cell), replace=False))
        tr = np.array(sorted(keep))
        # validation: a quarter of the SmolLM2 dev prompts (all their answers), for choosing epoch and threshold
        val_mask = np.array([sources[i] == "smollm2_dev" and zlib.crc32(rows[i]["prompt"].encode()) % 4 == 0
                             for i in tr])
        va, tr = tr[val_mask], tr[~val_mask]
        print("validation rows", len(va), "unsafe", int(y[va].sum()), flush=True)
        print("training rows", len(tr), dict(Counter(zip(sources[tr], y[tr]))), flush=True)
        if args.limit:
            rng0 = np.random.default_rng(0)
            tr = rng0.choice(tr, min(args.limit, len(tr)), replace=False)
            te = te[: args.limit]
        torch.manual_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
        if not args.full:
            cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                             target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"])
            model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        w = np.zeros(len(rows))
        w[tr] = weights_for(sources[tr], y[tr])
        rng = np.random.default_rng(args.seed)
        steps_per_epoch = math.ceil(len(tr) / args.bs)
        total = steps_per_epoch * args.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k, total=total: min(1.0, (k + 1) / (0.06 * total)) * max(0.0, (total - k) / total))
        t0 = time.time()
        step = 0
        for epoch in range(args.epochs):
            model.train()
            run = 0.0
            for b in batches(tr, lengths, args.bs, rng):
                x, t, m = collate(ids, tts, b, tok.pad_token_id)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    logits = model(input_ids=x, token_type_ids=t, attention_mask=m).logits[:, 0].float()
                target = torch.tensor(y[b], dtype=torch.float32)
                loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
                        * torch.tensor(w[b], dtype=torch.float32)).mean()
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                run += loss.item()
                step += 1
            zv = predict(model, ids, tts, list(va), tok.pad_token_id)
            cands = np.unique(zv)
            bal = [binary_metrics(y[va], zv >= c)["balanced_accuracy"] for c in cands]
            thr = float(cands[int(np.argmax(bal))])
            z = predict(model, ids, tts, list(te), tok.pad_token_id)
            met0 = binary_metrics(y[te], z >= 0)
            print(f"  val balanced acc at 0: {binary_metrics(y[va], zv >= 0)['balanced_accuracy']:.3f}, "
                  f"best {max(bal):.3f} at threshold {thr:.3f}; test at 0: {met0['accuracy']:.3f}", flush=True)
            met = binary_metrics(y[te], z >= thr)
            print(f"{args.task} split {'+'.join(train)} -> {test} epoch {epoch + 1} loss {run / steps_per_epoch:.3f} "
                  f"agreement {met['accuracy']:.3f} pos recall {met['unsafe_recall']:.3f} "
                  f"neg recall {met['safe_recall']:.3f} n {met['n']} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
