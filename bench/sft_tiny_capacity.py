"""Why LoRA on the tiny model learns so little: its frozen random 64-wide token embeddings, measured.

``sft_planted_rules.py`` found that LoRA through ``train_lora`` does not learn even a rule readable from the
candidate's title alone, which full fine-tuning learns to AUC 0.99. This separates the candidate causes on the
same prompts, rows and shared-prefix scorer (style ``text+none``, every training position of the first
``--users`` users, one in ten held out; see ``sft_planted_rules.py`` for the rules):

- ``candidate`` rule ("Yes." iff the candidate's title has one of the frequent title words covering half the
  items), four trainings from a fresh load each:
  1. LoRA through ``train_lora``, the shipped tiny LLaVA (hidden 64), the category's settings;
  2. the same LoRA plus trainable input embeddings (PEFT ``modules_to_save=["embed_tokens"]``, the same loop,
     batches and schedule): whether the frozen random embeddings are what LoRA cannot get past;
  3. full fine-tuning of every language-model weight (``sft_learnability.full_finetune``);
  4. LoRA through ``train_lora`` on a wider tiny LLaVA built here with the same tokenizer (hidden
     ``--wide-hidden``), at ``--wide-lr``: whether width alone lets LoRA read the candidate;
- ``match`` rule (the candidate shares a title word with the history) and the ``real`` labels (the demo's
  shape: each user's last training target, 1 negative; validated on the real valid 1+20 candidates of the
  seeded validation users), LoRA on the wide model only.

Works on a copy of the demo's database in ``bench/work/`` (run ``scripts/demo.sh`` first). Results:
``bench/results/sft_tiny_capacity.{json,md}``. About 13 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "sft_tiny_capacity"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANT = "lora:text+none"


def lora_with_embeddings(loaded, rows, validate, settings, choice_ids, log) -> dict:
    """``train_lora``'s adapter, schedule and batches (``train_epoch``), plus the input embeddings trained too."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    from srec.recommender.training import lora_target_modules, train_epoch

    torch.manual_seed(settings.seed)
    model = get_peft_model(loaded.model, LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=lora_target_modules(loaded.model), modules_to_save=["embed_tokens"], bias="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    total = math.ceil(math.ceil(len(rows) / settings.batch_size) / settings.grad_accumulation) * settings.epochs
    sched = get_scheduler(settings.lr_schedule, opt, num_warmup_steps=int(settings.warmup_ratio * total),
                          num_training_steps=total)
    model.eval()
    history = [{"epoch": 0, "valid_auc": validate(model)}]
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        fit = train_epoch(model, rows, opt, params, settings, epoch, pad_id=loaded.tokenizer.pad_token_id,
                          device=loaded.device, dtype=loaded.dtype, scheduler=sched, choice_ids=choice_ids)
        model.eval()
        history.append({"epoch": epoch, **fit, "valid_auc": validate(model),
                        "seconds": round(time.perf_counter() - t0, 1)})
        log(f"LoRA + embeddings epoch {epoch}: {json.dumps(history[-1])}")
    return {"trainable_parameters": sum(p.numel() for p in params), "history": history}


def lora_shipped(loaded, rows, validate, settings, choice_ids, log, work: Path) -> dict:
    from srec.recommender.training import train_lora

    shutil.rmtree(work, ignore_errors=True)  # a fresh run, never a resumed one
    _, r = train_lora(loaded.model, rows, validate, settings, pad_id=loaded.tokenizer.pad_token_id,
                      device=loaded.device, dtype=loaded.dtype, work_dir=work, run_key="capacity",
                      choice_ids=choice_ids, log=lambda m: log("LoRA " + m))
    return {"trainable_parameters": r.trainable_parameters,
            "history": [{"epoch": 0, "valid_auc": r.base_valid_auc}, *r.history]}


def full(loaded, rows, validate, settings, choice_ids, log, lr: float) -> dict:
    from sft_learnability import full_finetune

    history = full_finetune(loaded, rows, validate, settings, lr, settings.epochs, choice_ids, log)
    return {"trainable_parameters": sum(p.numel() for p in loaded.model.parameters() if p.requires_grad),
            "history": history}


def build_wide_model(hidden: int, out: Path) -> Path:
    """The shipped tiny models' recipe (same corpus, tokenizer and seed) at another width."""
    from srec.models import tiny

    s = replace(tiny.TinyModelSettings(), hidden_size=hidden, intermediate_size=round(hidden * 2.75))
    return tiny.build_tiny_models(tiny.category_texts(), out, s)["captioner"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default=str(ROOT / "data" / "srec.duckdb"))
    ap.add_argument("--category", default="beauty")
    ap.add_argument("--users", type=int, default=300, help="planted rules: the first N users' training positions")
    ap.add_argument("--wide-hidden", type=int, default=256)
    ap.add_argument("--wide-lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=1e-3)
    args = ap.parse_args()
    from sft_learnability import demo_copy
    from sft_planted_rules import all_training_targets, half_cover_words, planted_groups, prompt_setup, \
        title_words, untouched_samplers

    from srec.recommender import pipeline as P
    from srec.recommender.data import load_candidates, load_items, load_user_contexts

    started = time.perf_counter()
    con, cfg, settings = demo_copy(args.db, WORK, args.category, 1, variant=VARIANT)
    found = con.execute("SELECT any_value(model), count(*) FROM sft_examples WHERE category = ?",
                        [args.category]).fetchone()
    if not found[1]:
        sys.exit(f"{args.db} has no sft_examples for {args.category!r}: run scripts/demo.sh first")
    shipped = found[0]
    wide = str(build_wide_model(args.wide_hidden, WORK / "wide"))
    items = load_items(con, args.category)
    words_of = {i: title_words(info.title) for i, info in items.items()}
    chosen = half_cover_words(words_of)
    contexts = all_training_targets(con, args.category)
    samplers = untouched_samplers(con, args.category, items, cfg.seed)
    first = set(sorted({c.user_id for c in contexts})[:args.users])
    planted_contexts = [c for c in contexts if c.user_id in first]
    held_users = set(sorted(first)[::10])

    def history_words(ctx):
        return frozenset().union(*(words_of[h] for h in ctx.history_ids[-settings.history_items:]))

    def planted(rule):
        groups = planted_groups(planted_contexts, words_of, rule, samplers("planted"))
        return ([g for g in groups if g[0].user_id not in held_users],
                [g for g in groups if g[0].user_id in held_users], "pairs of held-out users (AUC over pairs)")

    def real():
        last = {c.user_id: c for c in contexts}  # each user's last training target, as the demo
        sample = samplers("real")
        train = [(c, [c.target_item, *sample(c.user_id, 1)]) for c in last.values()]
        cands = load_candidates(con, args.category, "valid", "1+20")
        users = P.validation_users(con, args.category, settings, cfg.seed)
        valid = [(replace(c, profile=""), [i for _, i in cands[c.user_id]])
                 for c in load_user_contexts(con, args.category, ["valid"], users)]
        return train, valid, "valid 1+20 candidates of the seeded validation users (mean AUC)"

    say = lambda m: print(m, flush=True)  # noqa: E731
    shipped_settings = replace(settings, epochs=2)
    plan = [  # (label set, training, model, settings)
        ("candidate", "LoRA, hidden 64 (shipped)", shipped, shipped_settings),
        ("candidate", "LoRA + trainable input embeddings, hidden 64", shipped, shipped_settings),
        ("candidate", f"full fine-tuning, hidden 64 (lr {args.full_lr})", shipped, shipped_settings),
        ("candidate", f"LoRA, hidden {args.wide_hidden}", wide, replace(settings, epochs=2, learning_rate=args.wide_lr)),
        ("match", f"LoRA, hidden {args.wide_hidden}", wide, replace(settings, epochs=3, learning_rate=args.wide_lr)),
        ("real", f"LoRA, hidden {args.wide_hidden}", wide, replace(settings, epochs=4, learning_rate=args.wide_lr)),
    ]
    rules = {"candidate": lambda ctx, i: bool(words_of[i] & chosen),
             "match": lambda ctx, i: bool(words_of[i] & history_words(ctx))}
    label_sets = {name: planted(rule) for name, rule in rules.items()}
    label_sets["real"] = real()
    runs = []
    for labels, training, model_path, s in plan:
        train, valid, validation = label_sets[labels]
        loaded, choice_ids, rows, validate = prompt_setup(model_path, train, valid, s, items)
        t0 = time.perf_counter()
        log = lambda m, t=training, l=labels: say(f"{l} / {t}: {m}")  # noqa: E731
        if training.startswith("full"):
            trained = full(loaded, rows, validate, s, choice_ids, log, args.full_lr)
        elif "embeddings" in training:
            trained = lora_with_embeddings(loaded, rows, validate, s, choice_ids, log)
        else:
            trained = lora_shipped(loaded, rows, validate, s, choice_ids, log, WORK / "lora")
        runs.append({"labels": labels, "training": training, "model": Path(model_path).parent.name + "/" +
                     Path(model_path).name, "learning_rate": args.full_lr if training.startswith("full") else
                     s.learning_rate, "epochs": s.epochs, "train_rows": len(rows), "validation_sets": len(valid),
                     "validation": validation, **trained, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "history"}
                         | {"valid_auc": [h["valid_auc"] for h in trained["history"]]}), flush=True)

    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/sft_tiny_capacity.py " + " ".join(sys.argv[1:]),
              "database": args.db, "category": args.category, "variant": VARIANT, "shipped_model": shipped,
              "frequent_words": len(chosen), "planted_users": len(first), "held_out_users": len(held_users),
              "settings": settings.training_json(), "runs": runs,
              "total_seconds": round(time.perf_counter() - started, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "sft_tiny_capacity"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Why LoRA on the tiny model learns so little: frozen random 64-wide embeddings", "",
             f"{result['date']}; `{result['command'].strip()}`; database `{Path(args.db).name}` (a copy), category "
             f"`{args.category}`, prompt style `text+none`; planted rules on every training position of the first "
             f"{len(first):,} users ({len(held_users)} held out), real labels on each user's last training target "
             f"(the demo's shape); each training from a fresh load of its base, no early stopping; LoRA r "
             f"{settings.lora_r}, alpha {settings.lora_alpha}, dropout {settings.lora_dropout}, {settings.lr_schedule}; "
             f"total {result['total_seconds']:.0f} s.", "",
             "| labels | training | trainable params | lr | train rows | epoch | answer loss | choice log loss | "
             "P(yes)+P(no) | valid AUC | s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        for h in r["history"]:
            head = ([r["labels"], r["training"], f"{r['trainable_parameters']:,}", f"{r['learning_rate']:g}",
                     f"{r['train_rows']:,}"] if h["epoch"] == 0 else ["", "", "", "", ""])
            fit = ([f"{h['train_loss']:.4f}", f"{h['train_choice_log_loss']:.4f}", f"{h['train_choice_mass']:.3f}"]
                   if h["epoch"] else ["", "", ""])
            lines.append("| " + " | ".join([*head, str(h["epoch"]), *fit, f"{h['valid_auc']:.4f}",
                                             f"{h['seconds']:.0f}" if h["epoch"] else ""]) + " |")
    lines += ["", "Labels: `candidate`: Yes. iff the candidate's title has one of "
              f"{len(chosen)} frequent title words (half the items have one); `match`: Yes. iff the candidate's "
              f"title shares a word with the last {settings.history_items} history titles; `real`: the true next "
              "item (Yes.) vs one never-touched item sampled uniformly (No.). Validation: planted rules on the "
              "held-out users' pairs (AUC over pairs), real labels on the valid 1+20 candidates of the seeded "
              "validation users. Choice log loss: on the training rows, -log of P(yes)/(P(yes)+P(no)) for the "
              "row's answer; ln 2 = 0.693 is a coin flip. Epoch 0: the base model, no training."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
