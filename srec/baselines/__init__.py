"""Classic sequential-recommendation baselines: popularity, SASRec and GRU4Rec, and a text-only reference
(title_overlap).

Trained on a category's leave-one-out positives, scored on the stored candidate sets and by full
ranking over all items (history excluded); results go to ``baseline_scores``,
``baseline_full_ranking`` and ``baseline_runs``.
"""
from srec.baselines.data import SplitData, load_candidates, load_split_data
from srec.baselines.evaluate import evaluate_split, full_ranking_counts
from srec.baselines.models import GRU4Rec, Popularity, SASRec, TitleOverlap
from srec.baselines.run import run_baselines, write_results
from srec.baselines.train import BaselineSettings, fit

__all__ = [
    "BaselineSettings",
    "GRU4Rec",
    "Popularity",
    "SASRec",
    "SplitData",
    "TitleOverlap",
    "evaluate_split",
    "fit",
    "full_ranking_counts",
    "load_candidates",
    "load_split_data",
    "run_baselines",
    "write_results",
]
