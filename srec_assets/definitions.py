"""The code location: `dagster dev -w workspace.yaml`, `dg check defs`, `dagster definitions validate`."""
from __future__ import annotations

import os

import dagster as dg

from resources import DEFAULT_MODELS, HallucinationScorer, ModelRunner, SrecStorage
from srec_assets.assets.baselines import baseline_scores
from srec_assets.assets.ingest import raw_items, raw_reviews
from srec_assets.assets.mllm import item_captions, item_images, user_preferences
from srec_assets.assets.report import metric_report
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.checks import ALL_CHECKS

ALL_ASSETS = [raw_reviews, raw_items, interactions, eval_candidates, item_images, item_captions, user_preferences,
              baseline_scores, metric_report]

# Everything for one category, checks included: what the demo command runs.
full_graph_job = dg.define_asset_job(
    name="full_graph",
    selection=dg.AssetSelection.assets(*ALL_ASSETS),
    description="Ingest -> interactions -> candidates -> images -> captions -> preferences; baselines -> metric report; one category.",
)

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[full_graph_job],
    resources={
        "storage": SrecStorage(),
        # The tiny offline models by default (built on first use); SREC_*_MODEL or the launchpad picks real ones.
        "captioner": ModelRunner(role="captioner", model=os.environ.get("SREC_CAPTIONER_MODEL", DEFAULT_MODELS["captioner"]),
                                 max_new_tokens=int(os.environ.get("SREC_CAPTION_MAX_NEW_TOKENS", "24"))),
        "summariser": ModelRunner(role="summariser", model=os.environ.get("SREC_SUMMARISER_MODEL", DEFAULT_MODELS["summariser"]),
                                  max_new_tokens=int(os.environ.get("SREC_SUMMARY_MAX_NEW_TOKENS", "24")),
                                  max_batch_size=32),
        "hallucination_scorer": HallucinationScorer(model=os.environ.get("SREC_CLIP_MODEL", HallucinationScorer().model)),
    },
)
