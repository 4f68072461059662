"""Write data/rbrm_labels/derived_helpfulness_labelled.jsonl: the benign rows of smollm2_dev.jsonl as labelled
answers (label 1 = the answer addresses the question, 0 = it deflects, refuses, drifts off topic or is gibberish).

The helpfulness probe (`helpfulness_probe` in a pipeline config) trains on it to rank the policy's own answers to
benign pool prompts. Only the dev file is used: its prompts are in no evaluation set.
"""

import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "rbrm_labels")

with open(os.path.join(HERE, "smollm2_dev.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
out = [{"prompt": r["prompt"], "response": r["response"], "label": int(bool(r["helpful"])), "kind": r["kind"],
        "source_id": r["id"]} for r in rows if r["benign"] and r["helpful"] is not None]
path = os.path.join(HERE, "derived_helpfulness_labelled.jsonl")
with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
os.replace(path + ".tmp", path)
print(f"{len(out)} rows ({sum(r['label'] for r in out)} helpful) -> {os.path.relpath(path)}")
