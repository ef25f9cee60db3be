# Ranking metrics for sequential recommendation with one held-out positive per user.
# A local `evaluate` module: load it by folder path, e.g.
#   evaluate.load("srec/metrics/ranking_metrics", "scores")
# or through srec.metrics.load_ranking_metrics(). The math lives in srec.metrics.core.
#
# evaluate scans this file's import lines to check dependencies: keep one module per
# `import` line (a combined `import a, b` line breaks loading).
import datasets
import evaluate
import numpy as np

from srec.metrics.core import DEFAULT_METRICS
from srec.metrics.core import mean_metrics
from srec.metrics.core import per_user_metrics
from srec.metrics.core import rank_counts_from_ragged
from srec.metrics.core import rank_counts_from_scores

_CITATION = """\
@inproceedings{krichene2020sampled,
  title={On Sampled Metrics for Item Recommendation},
  author={Krichene, Walid and Rendle, Steffen},
  booktitle={Proceedings of the 26th ACM SIGKDD International Conference on Knowledge Discovery \\& Data Mining},
  pages={1748--1757},
  year={2020}
}
"""

_DESCRIPTION = """\
HR@K, NDCG@K, MRR@K, Recall@K and AUC for leave-one-out recommendation: each user has
exactly one positive (the held-out item) ranked against negatives. Ties between the
positive and negatives are resolved as the expectation under uniformly random
tie-breaking (the positive's rank is uniform over the tied block), so constant scores
get chance-level metrics instead of optimistic or pessimistic ones.
Config "scores": one list of candidate scores and one list of 0/1 labels per user.
Config "rank_counts": per user [n_greater, n_ties, n_negatives] (e.g. from a full
ranking over all items), no references.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: config "scores": per user, a list of candidate scores (float; higher ranks first).
        config "rank_counts": per user, [n_greater, n_ties, n_negatives] (int): negatives scored
        strictly above the positive, negatives tied with it, all negatives.
    references: config "scores" only: per user, a list of 0/1 labels (exactly one 1), aligned
        with predictions. Not an input of config "rank_counts".
    metrics: metric names, default ('AUC', 'HR@1', 'HR@5', 'HR@10', 'NDCG@5', 'NDCG@10',
        'MRR@5', 'MRR@10', 'Recall@10'); 'NDCG' / 'MRR' without @K mean no cut-off.
    per_user: also return the per-user values under "per_user".
Returns:
    {metric: mean over users}, plus {"per_user": {metric: [value per user]}} when per_user=True.
Examples:
    >>> m = load_ranking_metrics("scores")
    >>> m.compute(predictions=[[0.9, 0.8, 0.95, 0.1]], references=[[1, 0, 0, 0]], metrics=["HR@1", "MRR@10"])
    {'HR@1': 0.0, 'MRR@10': 0.5}
    >>> m = load_ranking_metrics("rank_counts")
    >>> m.compute(predictions=[[1, 0, 3]], metrics=["HR@1", "MRR@10"])
    {'HR@1': 0.0, 'MRR@10': 0.5}
"""

_FEATURES = {
    "scores": datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Value("float64")),
            "references": datasets.Sequence(datasets.Value("int64")),
        }
    ),
    "rank_counts": datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Value("int64"), length=3),
        }
    ),
}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RankingMetrics(evaluate.Metric):
    def _info(self):
        if self.config_name == "default":  # evaluate.load(path) without a config name
            self.config_name = "scores"
        if self.config_name not in _FEATURES:
            raise KeyError(
                f"unknown config {self.config_name!r} for ranking_metrics; expected one of {sorted(_FEATURES)}"
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate allows a "numpy" format only for flat Value features; the inputs come
            # back as Python lists and are turned into arrays in _compute.
            features=_FEATURES[self.config_name],
            reference_urls=["https://doi.org/10.1145/3394486.3403226"],
        )

    def _compute(self, predictions, references=None, metrics=DEFAULT_METRICS, per_user=False):
        if self.config_name == "rank_counts":
            counts = np.asarray(predictions, dtype=np.int64).reshape(-1, 3)
            n_greater, n_ties, n_negatives = counts[:, 0], counts[:, 1], counts[:, 2]
        elif len(predictions) and len({len(p) for p in predictions}) == 1 and len({len(r) for r in references}) == 1:
            # every user has the same number of candidates: one matrix
            n_greater, n_ties, n_negatives = rank_counts_from_scores(
                np.asarray(predictions, dtype=np.float64), np.asarray(references)
            )
        else:
            n_greater, n_ties, n_negatives = rank_counts_from_ragged(list(predictions), list(references))
        values = per_user_metrics(n_greater, n_ties, n_negatives, tuple(metrics))
        result = mean_metrics(values)
        if per_user:
            result["per_user"] = {name: v.tolist() for name, v in values.items()}
        return result
