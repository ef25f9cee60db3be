"""The code location: `dagster dev -w workspace.yaml`, `dg check defs`, `dagster definitions validate`."""
from __future__ import annotations

import dagster as dg

from resources import SrecStorage
from srec_assets.assets.baselines import baseline_scores
from srec_assets.assets.ingest import raw_items, raw_reviews
from srec_assets.assets.report import metric_report
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.checks import ALL_CHECKS

ALL_ASSETS = [raw_reviews, raw_items, interactions, eval_candidates, baseline_scores, metric_report]

# Everything for one category, checks included: what the demo command runs.
full_graph_job = dg.define_asset_job(
    name="full_graph",
    selection=dg.AssetSelection.assets(*ALL_ASSETS),
    description="Ingest -> interactions -> candidates -> baselines -> metric report for one category.",
)

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[full_graph_job],
    resources={"storage": SrecStorage()},
)
