"""The methods a run compares, in one place: what each trains on, the stages it needs, its label in the report.

Every DPO method gets the same `dpo` settings and LoRA, so the table compares what the pairs are and whether
the loss carries confidence (the paper's table at small scale):

  base        the policy as it is
  dpo_static  DPO on a fixed pair file (`static_pairs`, e.g. HH-RLHF harmless)
  dpo_rerank  DPO on pairs re-ranked by the hybrid reward, without confidence
  rbrm        the same pairs with per-pair confidence from the hybrid reward on the current policy, which keeps
              learning (docs/method.md §4)
  online      an iterative online baseline: every round samples fresh responses from the current policy,
              scores them with the same (frozen) hybrid reward on the initial policy's states, and runs plain
              DPO on them; the rounds add up to the same number of updates
  safedpo     SafeDPO (Kim et al., ICLR 2026): offline DPO on pairs with per-response safety labels, the safe
              answer preferred and a safety margin in the loss; no reward model, no sampling (`safedpo` section)

A new baseline is one more `Method` here, plus its own stage (`rbrm.run_stages.STAGES`) if its pairs come from
somewhere new; the report and the figures know methods only through these attributes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # its row in report.md
    # Where its DPO pairs come from: None (no training), "static_pairs", "rerank" (the shared re-ranked pairs) or
    # "online" (its own rounds of sampling and scoring).
    pairs: str | None
    # The shared stages whose compute it spent on alignment, beside its own training (evaluation is apart).
    stages: tuple[str, ...] = ()
    confidence: str = "none"  # ConfidenceDPOConfig.confidence: "online" re-scores each pair on the current policy
    compared_with: tuple[str, ...] = ()  # the report's paired findings "is it safer than ...?", in this order
    # The stages whose FLOPs are preference construction (sampling and scoring; a stage's `construction_flops`
    # where it also trains), for the compute curve.
    construction: tuple[str, ...] = ()
    online: bool = False  # samples during training: the compute curve varies its rounds (`online_rounds`)
    costs_against: str | None = None  # the report states its compute over this method's

    @property
    def trains(self) -> bool:
        return self.pairs is not None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("base", "(a) base model", pairs=None),
    Method("dpo_static", "(b) DPO, static HH pairs", pairs="static_pairs", stages=("static_pairs",),
           compared_with=("base",), construction=("static_pairs",)),
    Method("dpo_rerank", "(c) DPO, re-ranked pairs", pairs="rerank", stages=("probe", "sample", "rerank"),
           compared_with=("base",), construction=("sample", "rerank")),
    Method("rbrm", "(d) RBRM: re-ranked + online confidence", pairs="rerank", stages=("probe", "sample", "rerank"),
           confidence="online", compared_with=("base", "dpo_rerank", "dpo_static", "online", "safedpo"),
           construction=("sample", "rerank")),
    Method("online", "(e) online sampling + DPO", pairs="online", stages=("probe",), compared_with=("base",),
           construction=("online",), online=True, costs_against="rbrm"),
    Method("safedpo", "(f) SafeDPO: safety-labelled pairs", pairs="safety_pairs", stages=("safety_pairs",),
           compared_with=("base",), construction=("safety_pairs",)),
)}

# The method every other is measured against: the one that does not train.
BASE = next(m.name for m in METHODS.values() if not m.trains)

# The paired comparisons the reports make, (a, b): is a safer than b? The paper's method first.
COMPARISONS = tuple((m.name, other) for m in sorted(METHODS.values(), key=lambda m: -len(m.compared_with))
                    for other in m.compared_with)


def label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name
