"""The promotion gate: a retrained adapter becomes the category's current (serving) adapter only if its
validation AUC is not worse than the current adapter's by more than a margin, on the same candidates.

The current adapter is re-scored on this run's validation candidates (its recorded figure was measured on
the data of its own run, which a retrain on new data has changed). An adapter trained on another base model
(another fingerprint: a switched model, or the same one re-saved by another library version) cannot serve
this one, as ``recommender_scores`` refuses it: the candidate replaces it without a comparison, and the
decision says why. Keeping it would leave the category with no adapter that can score.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class GateRow:
    variant: str
    candidate_valid_auc: float
    current_valid_auc: float | None   # None: the current set has no adapter for this variant
    passed: bool

    @property
    def delta(self) -> float | None:
        return None if self.current_valid_auc is None else self.candidate_valid_auc - self.current_valid_auc


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    candidate_version: str
    current_version: str | None
    margin: float
    rows: list[GateRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**asdict(self), "rows": [asdict(r) | {"delta": r.delta} for r in self.rows]}


def decide(candidate: dict[str, float], candidate_version: str, current: dict[str, float] | None,
           current_version: str | None, margin: float, *, current_unusable: str | None = None) -> PromotionDecision:
    """``candidate`` / ``current``: variant -> validation AUC on the same candidates. Every variant both sets
    trained must pass (candidate >= current - margin); variants only the candidate has pass (nothing to
    compare with, and the decision says so). ``current_unusable``: why the current adapter cannot serve this
    run's base model; the candidate then replaces it."""
    if margin < 0:
        raise ValueError(f"promotion margin must be >= 0, got {margin}")
    if current_unusable and current_version is not None and current_version != candidate_version:
        rows = [GateRow(v, a, None, True) for v, a in candidate.items()]
        return PromotionDecision(True, f"promoted over {current_version}, which {current_unusable}", candidate_version,
                                 current_version, margin, rows)
    if current_version is not None and current_version == candidate_version:
        # The same weights and lineage (a rerun that reused its finished training runs): nothing to re-score.
        rows = [GateRow(v, a, a, True) for v, a in candidate.items()]
        return PromotionDecision(True, "same content version as the current adapter", candidate_version,
                                 current_version, margin, rows)
    if current is None or current_version is None:
        rows = [GateRow(v, a, None, True) for v, a in candidate.items()]
        return PromotionDecision(True, "first adapter for the category: promoted", candidate_version, None, margin, rows)
    rows = [GateRow(v, a, current.get(v), current.get(v) is None or a >= current[v] - margin)
            for v, a in candidate.items()]
    failed = [r for r in rows if not r.passed]
    compared = [r for r in rows if r.current_valid_auc is not None]
    how = "re-scored on the same validation candidates"
    if failed:
        worst = min(failed, key=lambda r: r.delta)
        reason = (f"kept {current_version}: {len(failed)} of {len(compared)} variants worse than the current adapter "
                  f"({how}) by more than {margin:g}; {worst.variant} by {-worst.delta:.4f}")
        return PromotionDecision(False, reason, candidate_version, current_version, margin, rows)
    if not compared:
        reason = f"promoted: no variant in common with {current_version} to compare"
    else:
        reason = (f"promoted over {current_version}: every one of {len(compared)} variants within {margin:g} of the "
                  f"current adapter ({how}) or better")
    return PromotionDecision(True, reason, candidate_version, current_version, margin, rows)
