"""Ranking metrics: the math (``srec.metrics.core``) and the ``evaluate`` module wrapping it.

``load_ranking_metrics()`` loads the local ``evaluate`` module in
``srec/metrics/ranking_metrics/`` from its folder path: no Hugging Face Hub access.
"""
from __future__ import annotations

from pathlib import Path

from srec.metrics.core import (
    DEFAULT_METRICS,
    mean_metrics,
    parse_metric,
    per_user_metrics,
    rank_counts_from_ragged,
    rank_counts_from_scores,
)

RANKING_METRICS_PATH: Path = Path(__file__).resolve().parent / "ranking_metrics"
CONFIG_NAMES: tuple[str, ...] = ("scores", "rank_counts")


def load_ranking_metrics(config_name: str = "scores", **load_kwargs):
    """``evaluate.load`` of the project's ranking-metrics module (config ``"scores"`` or ``"rank_counts"``).

    ``keep_in_memory=True`` by default, so ``compute`` writes no cache files and takes no file locks.
    """
    import evaluate  # heavy; only needed here

    if config_name not in CONFIG_NAMES:
        raise ValueError(f"unknown config {config_name!r}; expected one of {CONFIG_NAMES}")
    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(RANKING_METRICS_PATH), config_name, **load_kwargs)


__all__ = [
    "CONFIG_NAMES",
    "DEFAULT_METRICS",
    "RANKING_METRICS_PATH",
    "load_ranking_metrics",
    "mean_metrics",
    "parse_metric",
    "per_user_metrics",
    "rank_counts_from_ragged",
    "rank_counts_from_scores",
]
