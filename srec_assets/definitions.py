"""The code location: `dagster dev -w workspace.yaml`, `dg check defs`, `dagster definitions validate`."""
from __future__ import annotations

import os

import dagster as dg

from resources import DEFAULT_MODELS, AdapterIOManager, HallucinationScorer, ModelRunner, SrecStorage
from srec_assets.assets.baselines import baseline_scores
from srec_assets.assets.ingest import raw_items, raw_reviews
from srec_assets.assets.mllm import item_captions, item_images, user_preferences
from srec_assets.assets.recommender import lora_adapter, recommender_scores, sft_examples
from srec_assets.assets.report import metric_report
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.automation import JOBS, SCHEDULES, SENSORS
from srec_assets.checks import ALL_CHECKS
from srec_assets.pool_slots import serialize_sqlite_slot_changes

serialize_sqlite_slot_changes()  # the pools below hold across processes on the SQLite instance (pool_slots.py)

ALL_ASSETS = [raw_reviews, raw_items, interactions, eval_candidates, item_images, item_captions, user_preferences,
              sft_examples, lora_adapter, recommender_scores, baseline_scores, metric_report]

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    # One step at a time in the run's own process: the model steps queue for the one GPU anyway (the gpu
    # pool), and a process per step would import torch and transformers ~45 times a run (minutes on a small
    # machine). Across runs, the pools in dagster.yaml still apply. A multi-machine executor replaces this
    # (README, "Scaling past one machine").
    executor=dg.in_process_executor,
    resources={
        "storage": SrecStorage(),
        # The tiny offline models by default (built on first use); SREC_*_MODEL or the launchpad picks real ones.
        "captioner": ModelRunner(role="captioner", model=os.environ.get("SREC_CAPTIONER_MODEL", DEFAULT_MODELS["captioner"]),
                                 max_new_tokens=int(os.environ.get("SREC_CAPTION_MAX_NEW_TOKENS", "24"))),
        "summariser": ModelRunner(role="summariser", model=os.environ.get("SREC_SUMMARISER_MODEL", DEFAULT_MODELS["summariser"]),
                                  max_new_tokens=int(os.environ.get("SREC_SUMMARY_MAX_NEW_TOKENS", "24")),
                                  max_batch_size=32),
        # The recommender's base (tiny LLaVA by default): SFT, LoRA / QLoRA and yes/no scoring.
        "recommender": ModelRunner(role="recommender", model=os.environ.get("SREC_RECOMMENDER_MODEL",
                                                                           DEFAULT_MODELS["recommender"]),
                                   max_new_tokens=24, max_batch_size=32),
        "adapter_io_manager": AdapterIOManager(),
        "hallucination_scorer": HallucinationScorer(model=os.environ.get("SREC_CLIP_MODEL", HallucinationScorer().model)),
    },
)
