"""The MLLM recommender: sft_examples -> lora_adapter -> recommender_scores (logic in srec.recommender)."""

import json
import shutil
import time

import dagster as dg
import pandas as pd

from resources import ModelRunner, SrecStorage
from srec.db import partition_content_hash
from srec.recommender import artifacts, promotion
from srec.recommender import pipeline as rec
from srec.recommender.data import RecommenderInputError, load_items, variant_needs
from srec.recommender.settings import RecommenderSettings, Variant
from srec_assets.assets.mllm import item_captions, item_images, user_preferences
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.partitions import category_config, category_partitions


class RecommenderConfig(dg.Config):
    """Run-config overrides of the category's ``recommender:`` settings (data/categories.yaml), which override
    srec.recommender.RecommenderSettings. Give the same variants to all three assets."""

    variants: list[str] | None = None      # e.g. ["lora:fused+recurrent", "lora:text+none", "zero-shot"]
    negatives_per_positive: int | None = None
    history_items: int | None = None
    max_length: int | None = None
    learning_rate: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    grad_accumulation: int | None = None
    patience: int | None = None
    valid_users: int | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lr_schedule: str | None = None
    protocols: list[str] | None = None
    score_batch_size: int | None = None
    promotion_margin: float | None = None


def recommender_settings(context, config: RecommenderConfig) -> RecommenderSettings:
    cfg = category_config(context)
    try:
        # RecommenderConfig's fields only: a subclass adds switches for one run that are not settings (rescore)
        return RecommenderSettings.from_mapping(cfg.recommender, **config.model_dump(
            include=set(RecommenderConfig.model_fields)))
    except ValueError as e:
        raise dg.Failure(f"recommender settings for {cfg.name!r}: {e}") from e


def _check_cuda(settings: RecommenderSettings, recommender: ModelRunner) -> None:
    """QLoRA loads the base in 4 bits through bitsandbytes: refuse before any work when there is no CUDA."""
    from srec.models.runner import ModelLoadError, resolve_device  # noqa: PLC0415

    qlora = [v.name for v in settings.parsed_variants if v.adapter == "qlora"]
    if qlora:
        try:
            device = resolve_device(recommender.device)
        except ModelLoadError as e:
            raise dg.Failure(str(e)) from e
        if not device.startswith("cuda"):
            raise dg.Failure(f"variants {qlora} are QLoRA: a 4-bit NF4 base through bitsandbytes needs CUDA, and this "
                             f"run's device is {device!r}. Run them on a GPU machine, or use 'lora:' variants on CPU.")


def _base_quantization(recommender: ModelRunner, variant: Variant) -> str:
    return "4bit" if variant.adapter == "qlora" else recommender.quantization


def _load_base(recommender: ModelRunner, variant: Variant):
    """A fresh copy of the base for training one variant: 4-bit NF4 for QLoRA, as configured otherwise."""
    return recommender.load_fresh(quantization=_base_quantization(recommender, variant))


def _shared_base(recommender: ModelRunner, variant: Variant):
    """The step's one read-only copy of the base for scoring a variant (adapters attached while they score)."""
    return recommender.shared_base(quantization=_base_quantization(recommender, variant))


def _in_base_order(recommender: ModelRunner, variants):
    """``variants`` with those on the resource's own numerics first, then those on a QLoRA 4-bit base, each in the
    given order: the step's shared base (``_shared_base``) then loads once per kind, however the config mixes them."""
    return sorted(variants, key=lambda v: _base_quantization(recommender, v) != recommender.quantization)


def _base_spec(recommender: ModelRunner, variant: Variant):
    """What ``_load_base`` would load (fingerprint, device, dtype), without loading the weights."""
    return recommender.spec(quantization=_base_quantization(recommender, variant))


class SftConfig(RecommenderConfig):
    """RecommenderConfig, plus: ``rebuild`` builds the rows afresh even when their input key (the same inputs,
    settings, base and code) says the stored ones are what a build would write."""

    rebuild: bool = False


@dg.asset(
    pool="gpu",
    partitions_def=category_partitions,
    group_name="recommender",
    kinds={"duckdb", "transformers"},
    code_version=rec.SFT_CODE_VERSION,
    deps=[user_preferences, item_captions, item_images, interactions],
    description=("Per training target: the instruction (profile + preference + recent items + candidate image and "
                 "caption) and the answer Yes./No., negatives balanced, for each trained variant's prompt style. "
                 "Rows whose inputs, settings, base and code are unchanged are kept (rebuild: true builds them)."),
)
def sft_examples(context: dg.AssetExecutionContext, config: SftConfig, storage: SrecStorage,
                 recommender: ModelRunner) -> dg.MaterializeResult:
    cfg = category_config(context)
    settings = recommender_settings(context, config)
    _check_cuda(settings, recommender)
    with storage.connect() as con:
        # The key from the base's files: kept rows need neither its weights nor (chain of thought) its generation.
        key = rec.sft_input_key(rec.scoring_inputs(con, cfg.name), settings, cfg.seed, recommender.spec())
        kept = None if config.rebuild else rec.kept_sft_examples(con, cfg.name, key)
        if kept is not None:
            stats, built_by = kept
            context.log.info(f"sft_examples {cfg.name}: kept the {stats.rows:,} rows built "
                             + (f"in Dagster run {built_by}" if built_by else "outside Dagster")
                             + " (their inputs, settings, base and code are unchanged; rebuild: true builds them again)")
        else:
            stats = rec.build_sft_examples(con, cfg.name, recommender.loaded, settings, seed=cfg.seed,
                                           log=context.log.info, input_key=key, run_id=context.run.run_id)
        sample = con.execute(
            "SELECT style, label, prefix_text || suffix_text || ' -> ' || answer AS prompt FROM sft_examples "
            "WHERE category = ? ORDER BY user_id, style, label DESC LIMIT 2", [cfg.name]).fetch_df()
    return dg.MaterializeResult(
        metadata={
            "rows": stats.rows, "styles": dg.MetadataValue.json(stats.styles), "training_targets": stats.targets,
            "positives": stats.positives, "negatives_low_rating": stats.low_rating,
            "negatives_sampled": stats.sampled, "prompts_truncated": stats.truncated_prompts,
            "summaries_cut": stats.summary_cut,
            "candidate_texts_cut": dg.MetadataValue.json(stats.candidate_texts_cut),
            "max_prompt_tokens": stats.max_prompt_tokens,
            "mean_prompt_tokens": round(stats.mean_prompt_tokens, 1), "seconds": round(stats.seconds, 1),
            "kept": kept is not None,
            "recommender": recommender.model,
            "example": dg.MetadataValue.md("\n\n".join(f"**{r.style}, label {r.label}**\n\n```\n{r.prompt}\n```"
                                                       for r in sample.itertuples())),
        },
        data_version=dg.DataVersion(stats.version),
    )


@dg.asset(
    pool="gpu",
    partitions_def=category_partitions,
    group_name="recommender",
    kinds={"pytorch", "peft"},
    code_version=rec.TRAINING_CODE_VERSION,
    io_manager_key="adapter_io_manager",
    deps=[sft_examples, eval_candidates, user_preferences, item_captions],
    description=("A LoRA (or QLoRA) adapter per trained variant, loss on the answer tokens, early-stopped on "
                 "validation AUC; PEFT format with a manifest (base model, data hashes, snapshots, prompts, "
                 "hyper-parameters, validation metrics)."),
)
def lora_adapter(context: dg.AssetExecutionContext, config: RecommenderConfig, storage: SrecStorage,
                 recommender: ModelRunner) -> dg.Output:
    cfg = category_config(context)
    settings = recommender_settings(context, config)
    _check_cuda(settings, recommender)
    trained = [v for v in settings.parsed_variants if v.trains]
    root = storage.artifact_dir("lora_adapter", cfg.name)
    staging = root / f"_staging-{context.run.run_id}"
    with storage.connect() as con:
        try:  # before anything is staged
            sft_recorded, sft_version = rec.check_example_settings(con, cfg.name, settings, seed=cfg.seed)
        except RecommenderInputError as e:
            raise dg.Failure(str(e)) from e
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        inputs = rec.scoring_inputs(con, cfg.name)  # what validation prompts read (validation keys)
        # The manifest's data hashes (preference_snapshot = user_preferences' DataVersion): a subset of the inputs.
        data = {"sft_examples": sft_version, **{k: inputs[k] for k in ("eval_candidates", "interactions",
                                                                          "caption_snapshot", "preference_snapshot")}}
        captioners = con.execute("SELECT DISTINCT model, model_fingerprint, prompt_version FROM item_captions "
                                 "WHERE category = ?", [cfg.name]).fetchall()
        summarisers = con.execute("SELECT DISTINCT mode, model, model_fingerprint, prompt_version FROM "
                                  "user_preferences WHERE category = ?", [cfg.name]).fetchall()
        items = load_items(con, cfg.name)
        entries, base = {}, None
        for variant in trained:
            base = _base_spec(recommender, variant)  # the weights are loaded only to train

            def load(variant=variant):
                loaded = _load_base(recommender, variant)
                context.log.info(f"training {variant.name} on {loaded.describe()['parameters']:,}-parameter "
                                 f"{recommender.model} ({loaded.device}, {loaded.dtype})")
                return loaded

            slug = rec.variant_slug(variant)
            # Its own style's rows, not the whole table's: adding a variant reuses the others' finished runs.
            data_key = {**data, "sft_examples": rec.sft_examples_version(con, cfg.name, variant.style)}
            done = rec.train_variant(con, cfg.name, variant, base, load, settings, seed=cfg.seed,
                                     out_dir=staging / slug, work_dir=root / "_work" / slug,
                                     data_key=json.dumps(data_key, sort_keys=True), items=items, log=context.log.info,
                                     run_id=context.run.run_id,
                                     validation_key=rec.validation_key(inputs, variant, base, settings, cfg.seed))
            entries[variant.name] = done.manifest_entry()
    describe = base.describe() if base else recommender.runner_settings().__dict__
    manifest = {
        "category": cfg.name,
        "base_model": recommender.model,
        "base_fingerprint": describe.get("fingerprint"),
        "tiny_random_weights": bool(base and rec.is_tiny_model(base.folder)),
        "device": describe.get("resolved_device"),
        "dtype": describe.get("resolved_dtype"),
        "data": data,
        "captions": [{"model": m, "fingerprint": f, "prompt_version": p} for m, f, p in captioners],
        "preferences": [{"mode": mo, "model": m, "fingerprint": f, "prompt_version": p} for mo, m, f, p in summarisers],
        # seed: torch and batch order (the settings'); data_seed: negatives and validation users (the category's)
        "settings": settings.training_json() | {"data_seed": cfg.seed},
        "sft_examples_styles": sft_recorded["styles"],  # their other settings equal the above (checked)
        "variants": entries,
        "dagster_run_id": context.run.run_id,
        "created_at": time.time(),
        "validation": "AUC on the stored valid 1+20 candidates" + (
            f" of {settings.valid_users} seeded users" if settings.valid_users else " of every user"),
    }
    staged = artifacts.stage(staging, manifest)
    with storage.connect() as con:
        decision = _promotion_gate(context, con, storage, recommender, settings, staged, base, items, inputs)
        staged = artifacts.stage(staging, {**manifest, "promotion": decision.as_dict()})  # same version
        rec.append_promotion(con, cfg.name, context.run.run_id, decision, time.time())
        rec.append_adapter_history(con, pd.DataFrame(
            [{"category": cfg.name, "version": staged.version, "run_id": context.run.run_id,
              "created_at": manifest["created_at"], "variant": name, "valid_auc": e["best_valid_auc"],
              "base_valid_auc": e["base_valid_auc"], "best_epoch": e["best_epoch"]} for name, e in entries.items()],
            columns=rec.ADAPTER_HISTORY_COLUMNS))
    table = pd.DataFrame([{"variant": k, "valid AUC (best)": round(e["best_valid_auc"], 4),
                           "valid AUC (base)": round(e["base_valid_auc"], 4), "best epoch": e["best_epoch"],
                           "epochs": e["epochs_run"], "examples": e["train_examples"],
                           "seconds": round(e["seconds"], 1), "trained in run": e["trained_run_id"],
                           "reused": e["reused"]} for k, e in entries.items()])
    gate = pd.DataFrame([{"variant": r.variant, "candidate valid AUC": round(r.candidate_valid_auc, 4),
                          "current valid AUC": None if r.current_valid_auc is None else round(r.current_valid_auc, 4),
                          "passed": r.passed} for r in decision.rows])
    return dg.Output(
        staged,
        metadata={
            "version": staged.version,
            "promoted": decision.promoted,
            "promotion": dg.MetadataValue.md(f"**{decision.reason}** (margin {decision.margin:g})\n\n"
                                             + gate.to_markdown(index=False)),
            "current_version": staged.version if decision.promoted else decision.current_version,
            "base_model": recommender.model,
            "tiny_random_weights": manifest["tiny_random_weights"],
            "variants": dg.MetadataValue.md(table.to_markdown(index=False) if len(table) else "_none trained_"),
            "valid_auc": dg.MetadataValue.json({k: e["best_valid_auc"] for k, e in entries.items()}),
            "caption_snapshot": data["caption_snapshot"],
            "preference_snapshot": data["preference_snapshot"],
            "manifest": dg.MetadataValue.json(json.loads(json.dumps(manifest, default=str))),
        },
        data_version=dg.DataVersion(staged.version),
    )


def _promotion_gate(context, con, storage: SrecStorage, recommender: ModelRunner, settings: RecommenderSettings,
                    staged: artifacts.AdapterSet, base, items, inputs: dict[str, str]) -> promotion.PromotionDecision:
    """Compare the new set with the category's current adapter on this run's validation candidates (``inputs``:
    ``scoring_inputs``, for the validation keys)."""
    cfg = category_config(context)
    candidate = {name: e["best_valid_auc"] for name, e in staged.manifest["variants"].items()}
    try:
        current = artifacts.load_current(storage.artifact_dir("lora_adapter"), cfg.name)
    except FileNotFoundError as e:  # a pointer to a deleted version: nothing to compare with
        context.log.warning(f"current adapter unreadable ({e}); treating this one as the first")
        current = None
    scores, unusable = None, None
    if current is not None and current.version != staged.version:
        if base is not None and current.manifest.get("base_fingerprint") == base.fingerprint:
            gated = {v.name: v for v in _in_base_order(recommender, settings.parsed_variants)
                     if v.trains and v.name in current.manifest["variants"]}
            keys = {name: rec.validation_key(inputs, v, _base_spec(recommender, v), settings, cfg.seed)
                    for name, v in gated.items()}

            def rescore(name: str) -> float:
                return rec.adapter_valid_auc(con, cfg.name, gated[name], _shared_base(recommender, gated[name]),
                                             current.adapter_path(name), settings, seed=cfg.seed, items=items)

            scores = rec.current_valid_aucs(current.manifest["variants"], keys, rescore,
                                            log=lambda m: context.log.info(f"{current.version} {m}"))
        else:  # another base model: recommender_scores could not load it on this one
            unusable = (f"was trained on base fingerprint {current.manifest.get('base_fingerprint')}, not this "
                        f"recommender's {base.fingerprint if base else None}: it cannot serve it")
    decision = promotion.decide(candidate, staged.version, scores if current else None,
                                current.version if current else None, settings.promotion_margin,
                                current_unusable=unusable)
    context.log.info(f"promotion gate: {decision.reason}")
    return decision


class ScoringConfig(RecommenderConfig):
    """RecommenderConfig, plus: ``rescore`` scores every variant afresh, even one whose stored scores have the
    same scoring key (the same inputs, model, adapter files, prompt settings and code)."""

    rescore: bool = False


@dg.asset(
    pool="gpu",
    partitions_def=category_partitions,
    group_name="recommender",
    kinds={"duckdb", "pytorch"},
    code_version=rec.SCORING_CODE_VERSION,
    deps=[eval_candidates, user_preferences, item_captions, item_images],
    description=("P(yes) / (P(yes) + P(no)) at the answer position for every stored test candidate, one forward "
                 "pass, the user's prompt prefix encoded once; one model name per variant, zero-shot included. "
                 "A variant whose scoring key is unchanged keeps its stored scores (run config rescore: true "
                 "scores it again)."),
)
def recommender_scores(context: dg.AssetExecutionContext, config: ScoringConfig, storage: SrecStorage,
                       recommender: ModelRunner, lora_adapter: artifacts.AdapterSet) -> dg.MaterializeResult:
    cfg = category_config(context)
    settings = recommender_settings(context, config)
    _check_cuda(settings, recommender)
    # Before any scoring: an adapter trained on prompts built otherwise would be scored on prompts it never saw.
    diffs = rec.prompt_settings_differences(lora_adapter.manifest.get("settings", {}), settings)
    if diffs and any(v.trains for v in settings.parsed_variants):
        raise dg.Failure(f"adapter {lora_adapter.version} was trained on prompts built with other settings than this "
                         f"run's ({'; '.join(diffs)}): score with the adapter's settings, or retrain lora_adapter with "
                         "these")
    frames, runs, summary, reused = [], [], [], []
    with storage.connect() as con:
        items = load_items(con, cfg.name)
        inputs = rec.scoring_inputs(con, cfg.name)
        for variant in _in_base_order(recommender, settings.parsed_variants):
            spec = _base_spec(recommender, variant)  # the weights are loaded only to score
            tiny = rec.is_tiny_model(spec.folder)
            entry, path = None, None
            if variant.trains:
                try:
                    path = lora_adapter.adapter_path(variant.name)
                except KeyError as e:
                    raise dg.Failure(f"{e}: materialize lora_adapter with the same variants") from e
                entry = lora_adapter.manifest["variants"][variant.name]
                if lora_adapter.manifest.get("base_fingerprint") != spec.fingerprint:
                    raise dg.Failure(f"adapter {lora_adapter.version} was trained on base fingerprint "
                                     f"{lora_adapter.manifest.get('base_fingerprint')}, the recommender is "
                                     f"{spec.fingerprint}: retrain lora_adapter")
            name = rec.report_model_name(variant, recommender.model, tiny)
            key = rec.scoring_key(inputs, variant, spec, settings, model_name=name,
                                  adapter=artifacts.adapter_files_hash(path) if path else None)
            stored = None if config.rescore else rec.reusable_scores(con, cfg.name, variant, name, key)
            if stored is not None:
                frame, scored = stored.frame, stored.scored
                origin = {"scored_run_id": stored.run["scored_run_id"], "scored_at": stored.run["scored_at"],
                          "device": stored.run["device"]}
                reused.append(variant.name)
                context.log.info(f"{variant.name}: inputs, model, adapter files and settings unchanged (scoring key "
                                 f"{key[:16]}): kept the {scored.rows:,} scores of run {origin['scored_run_id']}")
            else:
                loaded = _shared_base(recommender, variant)
                if loaded.fingerprint != spec.fingerprint:
                    raise dg.Failure(f"the files of {recommender.model} changed while this run read them "
                                     f"({spec.fingerprint} -> {loaded.fingerprint}): run it again")
                with rec.attached_adapter(loaded.model, path) as model:
                    frame, scored = rec.score_variant(con, cfg.name, variant, loaded, model, settings,
                                                      model_name=name, items=items, log=context.log.info)
                origin = {"scored_run_id": context.run.run_id, "scored_at": time.time(), "device": loaded.device}
            frames.append(frame)
            runs.append({"category": cfg.name, "model": name, "variant": variant.name,
                         "base_model": recommender.model, "base_fingerprint": spec.fingerprint,
                         "tiny_random_weights": tiny, "adapter_path": str(path) if path else None,
                         "adapter_version": lora_adapter.version if path else None,
                         "valid_auc": entry["best_valid_auc"] if entry else None,
                         "prompt_version": rec.style_prompt_versions(variant), "device": origin["device"],
                         "rows": scored.rows, "seconds": scored.seconds, "scoring_key": key,
                         "scored_run_id": origin["scored_run_id"], "scored_at": origin["scored_at"]})
            summary.append({"model": name, "users": scored.users, "rows": scored.rows,
                            **{f"test AUC {p}": round(a, 4) for p, a in scored.auc.items()},
                            "candidates/s": round(scored.candidates_per_second, 1),
                            "scored": "this run" if stored is None else f"reused (run {origin['scored_run_id']})"})
        order = [v.name for v in settings.parsed_variants]  # the summary in the config's order
        summary = [row for _, row in sorted(zip(runs, summary), key=lambda x: order.index(x[0]["variant"]))]
        rows = rec.write_scores(con, cfg.name, pd.concat(frames, ignore_index=True))
        rec.write_table(con, "recommender_runs", cfg.name, pd.DataFrame(runs), {"scored_at": "DOUBLE"})
        version = partition_content_hash(con, "recommender_scores", cfg.name)
    return dg.MaterializeResult(
        metadata={"rows": rows, "models": dg.MetadataValue.md(pd.DataFrame(summary).to_markdown(index=False)),
                  "adapter_version": lora_adapter.version, "protocols": dg.MetadataValue.json(list(settings.protocols)),
                  "preference_modes": dg.MetadataValue.json(sorted(variant_needs(settings.parsed_variants))),
                  "reused_variants": dg.MetadataValue.json(reused),
                  "scoring": "one forward pass per candidate batch on the user's cached prompt prefix; "
                             "P(yes)/(P(yes)+P(no)) at the answer position"},
        data_version=dg.DataVersion(version),
    )
