"""Can the tiny model learn the yes/no choice from the demo's SFT rows? Training-set diagnostics.

The issue's tiny-model check asks SFT to lift test AUC to >= 0.60. This measures, on the demo's own
``sft_examples`` (run ``scripts/demo.sh`` first), where that fails:

- signal: for every SFT target, whether the positive's title shares more (rarity-weighted) words with the
  prompt's history titles than the negative's (pair accuracy, ties half; the weights of
  ``title_overlap_reference.py``): the text the model reads does separate the rows;
- LoRA with the category's recommender settings (``data/categories.yaml``), ``--epochs`` epochs without
  early stopping, through ``train_lora``: per epoch the answer loss, the yes/no choice log loss on the
  training rows (ln 2 = 0.693 is a coin flip on these balanced rows), P(yes)+P(no), validation AUC;
- full fine-tuning of every language-model weight (embeddings and ``lm_head`` included; vision tower and
  projector frozen), same rows and batches, AdamW at a constant learning rate ``--full-lr``, no dropout:
  whether more trainable capacity than LoRA's fits the choice, and whether fitting it generalises.

Works on a copy of the database in ``bench/work/`` (the demo's is not touched). Results:
``bench/results/sft_learnability{--tag}.{json,md}``. About 10 minutes on 2 cores with the default 4 epochs.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "sft_learnability"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANT = "lora:fused+recurrent"


def pair_signal(con, category: str, history_items: int) -> dict:
    """Share of SFT targets whose positive title overlaps the history titles more than its negatives' do."""
    from srec.recommender.data import load_user_contexts
    from title_overlap_reference import title_weights, words

    titles, weight = title_weights(con, category)
    history = {(c.user_id, c.target_seq_index): c.history_ids[-history_items:]
               for c in load_user_contexts(con, category, ["train"])}
    by_target: dict[tuple, dict[int, list[str]]] = collections.defaultdict(lambda: {0: [], 1: []})
    for user, seq, item, label in con.execute(
            "SELECT user_id, target_seq_index, item_id, label FROM sft_examples WHERE category = ? AND style = ?",
            [category, VARIANT.split(":")[1]]).fetchall():
        by_target[(user, seq)][int(label)].append(item)
    wins = []
    for key, items in by_target.items():
        seen = set().union(*(words(titles.get(i, "")) for i in history[key]))
        score = {i: sum(weight[w] for w in words(titles.get(i, "")) & seen) for i in items[0] + items[1]}
        for pos in items[1]:
            for neg in items[0]:
                wins.append(1.0 if score[pos] > score[neg] else 0.5 if score[pos] == score[neg] else 0.0)
    return {"pairs": len(wins), "pair_accuracy": round(sum(wins) / len(wins), 4)}


def full_finetune(loaded, rows, validate, settings, lr: float, epochs: int, choice_ids, log) -> list[dict]:
    """Every language-model weight trained on the answer loss, epoch by epoch as ``train_lora`` does (its
    ``train_epoch``: same batches, loss and clipping), at a constant learning rate."""
    import dataclasses

    import torch

    from srec.recommender.training import train_epoch

    model = loaded.model
    frozen = ("vision_tower", "multi_modal_projector")
    for name, p in model.named_parameters():
        p.requires_grad = not any(f in name for f in frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(settings.seed)
    one_step = dataclasses.replace(settings, grad_accumulation=1)
    model.eval()
    history = [{"epoch": 0, "valid_auc": validate(model)}]
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        fit = train_epoch(model, rows, opt, params, one_step, epoch, pad_id=loaded.tokenizer.pad_token_id,
                          device=loaded.device, dtype=loaded.dtype, choice_ids=choice_ids)
        model.eval()
        entry = {"epoch": epoch, **fit, "valid_auc": validate(model), "seconds": round(time.perf_counter() - t0, 1)}
        history.append(entry)
        log(f"full fine-tuning epoch {epoch}: {json.dumps(entry)}")
    return history


def demo_copy(db_path: str, work: Path, category: str, epochs: int, *, variant: str = VARIANT, fresh: bool = False):
    """(connection to a copy of the demo's database in ``work``, the category's config, its recommender settings
    for ``variant`` with ``epochs`` epochs and no early stopping). ``fresh``: ``work`` emptied first."""
    import duckdb

    from srec.config import load_categories
    from srec.recommender.settings import RecommenderSettings

    if fresh:
        shutil.rmtree(work, ignore_errors=True)  # a fresh run every time, never a resumed one
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(db_path, work / "copy.duckdb")
    cfg = load_categories()[category]
    settings = RecommenderSettings.from_mapping(cfg.recommender, variants=(variant,), epochs=epochs, patience=0)
    return duckdb.connect(str(work / "copy.duckdb")), cfg, settings


def lora_then_full(setup, settings, work: Path, full_lr: float, log=print) -> dict:
    """The same rows trained two ways, each from a fresh ``setup()`` (-> loaded base, (yes id, no id), rows,
    validate): LoRA through ``train_lora`` (a fresh run in ``work``), then full fine-tuning, ``settings.epochs``
    epochs each."""
    from srec.recommender.training import train_lora

    loaded, choice_ids, rows, validate = setup()
    t0 = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)  # a fresh run every time, never a resumed one
    _, lora = train_lora(loaded.model, rows, validate, settings, pad_id=loaded.tokenizer.pad_token_id,
                         device=loaded.device, dtype=loaded.dtype, work_dir=work, run_key="study",
                         choice_ids=choice_ids, log=lambda m: log("LoRA " + m))
    lora_seconds = time.perf_counter() - t0
    loaded, choice_ids, rows, validate = setup()
    t0 = time.perf_counter()
    full = full_finetune(loaded, rows, validate, settings, full_lr, settings.epochs, choice_ids, log)
    return {
        "train_rows": len(rows),
        "lora": {"trainable_parameters": lora.trainable_parameters, "base_valid_auc": lora.base_valid_auc,
                 "history": lora.history, "seconds": round(lora_seconds, 1)},
        "full_finetune": {"learning_rate": full_lr,
                          "trainable_parameters": sum(p.numel() for p in loaded.model.parameters() if p.requires_grad),
                          "history": full, "seconds": round(time.perf_counter() - t0, 1)},
    }


def lora_and_full(con, category: str, model_path: str, settings, seed: int, items, work: Path, full_lr: float, *,
                  fingerprint: str | None = None, log=print) -> dict:
    """``lora_then_full`` on the category's ``sft_examples`` (of ``VARIANT``'s style) from ``model_path``,
    validated on the category's seeded valid users. ``fingerprint``: the model the rows were built for,
    checked when given."""
    from srec.models.runner import LoadedModel, RunnerSettings
    from srec.recommender import pipeline as P
    from srec.recommender.encoding import PromptEncoder
    from srec.recommender.settings import Variant

    variant = Variant.parse(VARIANT)

    def setup():
        loaded = LoadedModel(RunnerSettings(model=model_path, device="cpu", dtype="float32"))
        if fingerprint is not None and loaded.fingerprint != fingerprint:
            sys.exit(f"{model_path} is not the model the sft_examples were built for: run scripts/demo.sh again")
        encoder = PromptEncoder(loaded, max_length=settings.max_length)
        rows = P.load_train_rows(con, category, variant.style, encoder, loaded)
        _, validate = P.validation_scorer(con, category, variant, loaded, settings, seed=seed, items=items)
        return loaded, (encoder.yes_id, encoder.no_id), rows, validate

    return lora_then_full(setup, settings, work, full_lr, log)


def sft_table(runs: dict, lora_lr: float) -> list[str]:
    """Markdown table of ``lora_and_full``'s two runs, epoch by epoch (epoch 0: the base, no training)."""
    lora, full = runs["lora"], runs["full_finetune"]
    lines = ["| training | trainable params | epoch | answer loss | choice log loss | P(yes)+P(no) | valid AUC | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, params, hist, base in (
            (f"LoRA (lr {lora_lr})", lora["trainable_parameters"], lora["history"], lora["base_valid_auc"]),
            (f"full fine-tuning (lr {full['learning_rate']})", full["trainable_parameters"], full["history"][1:],
             full["history"][0]["valid_auc"])):
        lines.append(f"| {name} | {params:,} | 0 | | | | {base:.4f} | |")
        lines += [f"| | | {h['epoch']} | {h['train_loss']:.4f} | {h['train_choice_log_loss']:.4f} | "
                  f"{h['train_choice_mass']:.3f} | {h['valid_auc']:.4f} | {h['seconds']:.0f} |" for h in hist]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default=str(ROOT / "data" / "srec.duckdb"))
    ap.add_argument("--category", default="beauty")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--tag", default="", help="suffix of the results files' names (sft_learnability<tag>.*)")
    args = ap.parse_args()
    from srec.recommender.data import load_items
    from srec.recommender.settings import Variant

    started = time.perf_counter()
    con, cfg, settings = demo_copy(args.db, WORK, args.category, args.epochs)
    variant = Variant.parse(VARIANT)
    model_path, fingerprint, n_rows = con.execute(
        "SELECT any_value(model), any_value(model_fingerprint), count(*) FROM sft_examples WHERE category = ? "
        "AND style = ?", [args.category, variant.style]).fetchone()
    if not n_rows:
        sys.exit(f"{args.db} has no {variant.style} sft_examples for {args.category!r}: run scripts/demo.sh first")
    items = load_items(con, args.category)
    signal = pair_signal(con, args.category, settings.history_items)
    print(f"signal: {json.dumps(signal)}", flush=True)

    runs = lora_and_full(con, args.category, model_path, settings, cfg.seed, items, WORK / "lora", args.full_lr,
                         fingerprint=fingerprint, log=lambda m: print(m, flush=True))

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/sft_learnability.py " + " ".join(sys.argv[1:]),
        "database": args.db, "category": args.category, "variant": VARIANT, "model": model_path,
        "model_fingerprint": fingerprint, "train_rows": runs["train_rows"],
        "settings": settings.training_json(), "signal": signal, "coin_flip_log_loss": round(math.log(2), 4),
        "lora": runs["lora"], "full_finetune": runs["full_finetune"],
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sft_learnability{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Can the tiny model learn the yes/no choice? SFT diagnostics on the demo's rows", "",
             f"{result['date']}; `{result['command'].strip()}`; database `{Path(args.db).name}` (a copy), category "
             f"`{args.category}`, variant `{VARIANT}`, model `{Path(model_path).name}` (fingerprint {fingerprint}), "
             f"{runs['train_rows']:,} SFT rows; validation: 1+20 valid candidates of "
             f"{settings.valid_users or 'all'} seeded users; total {result['total_seconds']:.0f} s.", "",
             f"Signal in the rows: the positive's title shares more rarity-weighted words with the prompt's "
             f"{settings.history_items} history titles than the negative's in **{signal['pair_accuracy']:.3f}** of "
             f"{signal['pairs']:,} pairs (ties half).", "",
             "Choice log loss: -log of the score's probability for the row's answer, P(yes)/(P(yes)+P(no)) at the "
             f"first answer token, on the training rows: {math.log(2):.3f} (ln 2) is a coin flip.", ""]
    lines += sft_table(runs, settings.learning_rate)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
