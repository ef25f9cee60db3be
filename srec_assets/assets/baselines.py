"""baseline_scores: popularity, SASRec, GRU4Rec and title_overlap scored on the stored candidates and by full ranking."""

import dagster as dg
import pandas as pd

from resources import SrecStorage
from srec.baselines import BaselineSettings, run_baselines
from srec.baselines.run import BASELINE_CODE_VERSION
from srec.baselines.train import MODELS
from srec.db import partition_content_hash
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.partitions import category_config, category_partitions


class BaselineConfig(dg.Config):
    """Run-config overrides. Unset fields keep the category's `baselines:` settings from
    data/categories.yaml, then srec.baselines.BaselineSettings defaults."""

    models: list[str] | None = None  # default: popularity, sasrec, gru4rec, title_overlap
    loss: str | None = None  # 'ce' (cross-entropy over all items) or 'bce' (SASRec's original sampled loss)
    max_epochs: int | None = None
    patience: int | None = None
    batch_size: int | None = None
    device: str | None = None  # 'auto' | 'cpu' | 'cuda'
    # A model whose inputs (interactions, candidates, titles), settings, device and code are those of its stored
    # run keeps its stored results; true trains and scores every model again.
    retrain: bool = False


def baseline_settings(category_settings: dict, overrides: dict, *, max_len: int, seed: int,
                      has_item_file: bool = True) -> BaselineSettings:
    """Defaults < category config < run config. max_len and seed come from the category. A category without an
    items file has no titles: the default models leave title_overlap out (asked for by name, it is an error)."""
    merged = {"max_len": max_len, "seed": seed, **category_settings}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if "models" in merged:
        merged["models"] = tuple(merged["models"])
    elif not has_item_file:
        merged["models"] = tuple(m for m in MODELS if m != "title_overlap")
    return BaselineSettings(**merged)


@dg.asset(
    pool="gpu",
    partitions_def=category_partitions,
    group_name="baselines",
    kinds={"pytorch", "duckdb"},
    code_version=BASELINE_CODE_VERSION,
    deps=[interactions, eval_candidates],
    description=(
        "Classic baselines trained on train, early-stopped on valid, scored on both stored candidate "
        "sets and by full ranking over all items with the user's history excluded. A model whose inputs, "
        "settings and code are unchanged keeps its stored results (retrain: true trains it again)."
    ),
)
def baseline_scores(
    context: dg.AssetExecutionContext, config: BaselineConfig, storage: SrecStorage
) -> dg.MaterializeResult:
    cfg = category_config(context)
    settings = baseline_settings(
        cfg.baselines, config.model_dump(exclude={"retrain"}), max_len=cfg.filtering.max_history, seed=cfg.seed,
        has_item_file=cfg.items is not None,
    )
    with storage.connect() as con:
        summaries = run_baselines(con, cfg.name, settings, log=context.log.info, retrain=config.retrain,
                                  run_id=context.run.run_id)
        version = "-".join(
            partition_content_hash(con, t, cfg.name) for t in ("baseline_scores", "baseline_full_ranking")
        )
    runs = pd.DataFrame(summaries)
    shown = [c for c in ("model", "kept", "trained_run_id", "epochs_run", "best_epoch", "best_valid_ndcg10",
                         "train_seconds", "device") if c in runs]
    return dg.MaterializeResult(
        metadata={
            "models": dg.MetadataValue.json(list(settings.models)),
            "kept_models": dg.MetadataValue.json([r["model"] for r in summaries if r["kept"]]),
            "training": dg.MetadataValue.md(runs[shown].to_markdown(index=False)),
            "settings": dg.MetadataValue.json(summaries[0].get("settings", {}) if summaries else {}),
        },
        data_version=dg.DataVersion(version),
    )
