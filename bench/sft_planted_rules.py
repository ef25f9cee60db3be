"""Which yes/no rules can the tiny model learn through srec's own SFT and scoring? Planted rules vs real labels.

The issue's tiny-model check (SFT lifts test AUC on 1+20 to >= 0.60) is meant as proof that training and scoring
are wired right. ``sft_learnability.py`` shows the demo's LoRA does not learn the real labels. This separates
"wired wrong" from "cannot learn this rule": the same prompts, the same shared-prefix scorer, and two trainings
per label set, each from a fresh load of the base: LoRA through ``train_lora`` with the category's settings
(the shipped path), and every language-model weight trained (``sft_learnability.full_finetune``: the same
batches, answer loss and clipping). Three label sets:

- ``candidate rule``: "Yes." iff the candidate's title contains one of a fixed set of title words (the most
  frequent words, taken until they cover half of the items). Readable from the candidate alone. If training or
  scoring were miswired (loss on the wrong tokens, the answer read at the wrong position, the candidate not
  reaching the answer, adapter weights not used when scoring), this could not be learned.
- ``match rule``: "Yes." iff the candidate's title shares a word with the prompt's history titles. The skill
  the real labels need (the title-overlap reference ranks the real candidates at AUC 0.70), here without
  noise.
- ``real labels``: the true next item vs an item sampled uniformly from those the user never touched, as in
  ``sft_examples``; validated on the real valid 1+20 candidates.

Targets: every training position of every user with SFT targets in the demo's database (not only the last one,
as the demo does), so about 6.5x the demo's rows. Prompt style ``text+none`` (the item list and the
candidate's own text): the demo computes preference summaries only for each user's last training target, and
a summary of a later history would leak. The profile line is left empty for the same reason (the stored one is
as of the last training target). For the two planted rules, each target gets one item the rule says yes to
and one it says no to (the target and items the user never touched, sampled with a fixed seed), and one user
in ``--holdout-every`` is held out: their pairs are the validation set (AUC over pairs = the share of pairs the
yes item scores above the no item, ties half).

Works on a copy of the demo's database in ``bench/work/`` (run ``scripts/demo.sh`` first). Results:
``bench/results/sft_planted_rules{--tag}.{json,md}``. About 20 minutes on 2 cores per epoch (``--epochs``).
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "sft_planted_rules"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANT = "lora:text+none"
# Words that say nothing about what an item is (sizes, counts, articles): left out of both rules.
STOP = frozenset("the and for with oz fl ml pack count set ounce ounces piece pieces pcs inch".split())


def title_words(title: str | None) -> frozenset[str]:
    """``title_overlap_reference.words`` (3+ letters or digits), less the STOP words."""
    from title_overlap_reference import words

    return frozenset(words(title or "")) - STOP


def half_cover_words(words_of: dict[str, frozenset[str]]) -> set[str]:
    """The most frequent title words, taken until the items holding one of them are at least half."""
    freq = collections.Counter(w for ws in words_of.values() for w in ws)
    chosen: set[str] = set()
    covered = 0
    for w, _ in freq.most_common():
        if covered >= len(words_of) / 2:
            break
        chosen.add(w)
        covered = sum(1 for ws in words_of.values() if ws & chosen)
    return chosen


def all_training_targets(con, category: str):
    """A context per training position >= 1 of every user with SFT targets, empty profile, no summaries."""
    from srec.recommender.data import UserContext, load_user_contexts

    users = sorted({c.user_id for c in load_user_contexts(con, category, ["train"])})
    seqs: dict[str, list[tuple[int, str]]] = {}
    for user, item, seq in con.execute(
            "SELECT user_id, item_id, seq_index FROM interactions WHERE category = ? AND split = 'train' "
            "AND label = 1 ORDER BY user_id, seq_index", [category]).fetchall():
        seqs.setdefault(user, []).append((int(seq), item))
    return [UserContext(u, "train", seqs[u][k][0], seqs[u][k][1], "", tuple(i for _, i in seqs[u][:k]), {})
            for u in users for k in range(1, len(seqs.get(u, ())))]


def untouched_samplers(con, category: str, items, seed: int):
    """``sampler(name)``: a sampler of items a user never touched, seeded by ``seed`` and ``name`` (so each label
    set draws the same items whatever ran before it)."""
    touched: dict[str, set[str]] = {}
    for user, item in con.execute("SELECT user_id, item_id FROM interactions WHERE category = ?",
                                  [category]).fetchall():
        touched.setdefault(user, set()).add(item)
    pool = np.array(sorted(items), dtype=object)
    return lambda name: _sampler(touched, pool, np.random.default_rng([seed, *name.encode()]))


def _sampler(touched, pool, rng):
    def sample(user: str, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            i = rng.choice(pool)
            if i not in touched[user] and i not in out:
                out.append(i)
        return out

    return sample


def planted_groups(contexts, words_of, rule, sample):
    """(context, [yes item, no item]) per target where the rule has both among the target + 30 sampled items."""
    groups = []
    for ctx in contexts:
        says = [(i, rule(ctx, i)) for i in [ctx.target_item, *sample(ctx.user_id, 30)]]
        yes = [i for i, y in says if y]
        no = [i for i, y in says if not y]
        if yes and no:
            groups.append((ctx, [yes[0], no[0]]))
    return groups


def prompt_setup(model_path: str, groups, validation_groups, settings, items):
    """A fresh load of ``model_path`` and, on it: (loaded, (yes id, no id), training rows of ``groups``, validate).
    ``groups``: (context, [yes item, no item]); ``validate(model)``: through the shared-prefix scorer on
    ``validation_groups``, the mean AUC of each group's first item against the rest (for [yes, no] pairs: the
    share of pairs ordered right, ties half)."""
    from srec.models.runner import LoadedModel, RunnerSettings
    from srec.recommender import pipeline as P
    from srec.recommender.encoding import NO, YES, PromptEncoder
    from srec.recommender.scoring import mean_auc
    from srec.recommender.settings import Variant
    from srec.recommender.training import make_row

    variant = Variant.parse(VARIANT)
    size = len(validation_groups[0][1])
    loaded = LoadedModel(RunnerSettings(model=model_path, device="cpu", dtype="float32"))
    encoder = PromptEncoder(loaded, max_length=settings.max_length)
    rows = [make_row(up.prefix_ids, e, encoder.answer_ids[YES if k == 0 else NO])
            for up in P.build_prompts(encoder, variant, groups, items, settings) for k, e in enumerate(up.encoded)]
    held = P.build_prompts(encoder, variant, validation_groups, items, settings)

    def validate(model) -> float:
        return mean_auc(np.concatenate(P.score_prompts(model, held, encoder, settings, loaded)), size)

    return loaded, (encoder.yes_id, encoder.no_id), rows, validate


def run(name: str, model_path: str, groups, validation_groups, settings, items, work: Path, full_lr: float,
        log=print) -> dict:
    """``sft_learnability.lora_then_full`` on ``groups`` ([yes item, no item] per context), validated on
    ``validation_groups`` (``prompt_setup``)."""
    from sft_learnability import lora_then_full

    return {"train_targets": len(groups), "validation_sets": len(validation_groups),
            "validation_candidates_per_set": len(validation_groups[0][1]),
            **lora_then_full(lambda: prompt_setup(model_path, groups, validation_groups, settings, items),
                             settings, work, full_lr, lambda m: log(f"{name}: {m}"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default=str(ROOT / "data" / "srec.duckdb"))
    ap.add_argument("--category", default="beauty")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--holdout-every", type=int, default=10)
    ap.add_argument("--users", type=int, default=0, help="only the first N users (a smoke run); 0: all")
    ap.add_argument("--rules", default="candidate,match,real", help="which label sets to train, in order")
    ap.add_argument("--tag", default="", help="suffix of the results files' names (sft_planted_rules<tag>.*)")
    args = ap.parse_args()
    from sft_learnability import demo_copy, sft_table
    from srec.recommender.data import load_candidates, load_items, load_user_contexts
    from srec.recommender.pipeline import validation_users

    started = time.perf_counter()
    con, cfg, settings = demo_copy(args.db, WORK, args.category, args.epochs, variant=VARIANT)
    found = con.execute("SELECT any_value(model), count(*) FROM sft_examples WHERE category = ?",
                        [args.category]).fetchone()
    if not found[1]:
        sys.exit(f"{args.db} has no sft_examples for {args.category!r}: run scripts/demo.sh first")
    model_path = found[0]
    items = load_items(con, args.category)
    words_of = {i: title_words(info.title) for i, info in items.items()}
    chosen = half_cover_words(words_of)
    contexts = all_training_targets(con, args.category)
    if args.users:
        keep = set(sorted({c.user_id for c in contexts})[:args.users])
        contexts = [c for c in contexts if c.user_id in keep]
    held_users = set(sorted({c.user_id for c in contexts})[::args.holdout_every])
    samplers = untouched_samplers(con, args.category, items, cfg.seed)

    def history_words(ctx):
        return frozenset().union(*(words_of[h] for h in ctx.history_ids[-settings.history_items:]))

    rules = {"candidate": lambda ctx, i: bool(words_of[i] & chosen),
             "match": lambda ctx, i: bool(words_of[i] & history_words(ctx))}
    descriptions = {
        "candidate": f"Yes. iff the candidate's title has one of {len(chosen)} frequent title words "
                     "(half the items have one)",
        "match": f"Yes. iff the candidate's title shares a word with the last {settings.history_items} "
                 "history titles",
        "real": "the true next item (Yes.) vs one never-touched item sampled uniformly (No.)"}
    say = lambda m: print(m, flush=True)  # noqa: E731
    runs = {}
    for rule in args.rules.split(","):
        sample = samplers(rule)
        if rule == "real":
            groups = [(c, [c.target_item, *sample(c.user_id, 1)]) for c in contexts]
            users = validation_users(con, args.category, settings, cfg.seed)
            cands = load_candidates(con, args.category, "valid", "1+20")
            valid = [(replace(c, profile=""), [i for _, i in cands[c.user_id]])
                     for c in load_user_contexts(con, args.category, ["valid"], users)]
            runs[rule] = run(rule, model_path, groups, valid, settings, items, WORK / rule, args.full_lr, say)
            runs[rule]["validation"] = "valid 1+20 candidates of the seeded validation users (mean AUC)"
        else:
            groups = planted_groups(contexts, words_of, rules[rule], sample)
            train = [g for g in groups if g[0].user_id not in held_users]
            held = [g for g in groups if g[0].user_id in held_users]
            runs[rule] = run(rule, model_path, train, held, settings, items, WORK / rule, args.full_lr, say)
            runs[rule]["validation"] = (f"pairs of the {len(held_users)} held-out users (1 in "
                                        f"{args.holdout_every}; AUC over pairs)")
        runs[rule]["labels"] = descriptions[rule]
        summary = {k: v for k, v in runs[rule].items() if k not in ("lora", "full_finetune")}
        print(json.dumps({rule: summary}), flush=True)

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/sft_planted_rules.py " + " ".join(sys.argv[1:]),
        "database": args.db, "category": args.category, "variant": VARIANT, "model": model_path,
        "settings": settings.training_json(), "targets": len(contexts), "users": len({c.user_id for c in contexts}),
        "runs": runs, "total_seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sft_planted_rules{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Planted rules vs real labels: what the tiny model learns through srec's SFT and scoring", "",
             f"{result['date']}; `{result['command'].strip()}`; database `{Path(args.db).name}` (a copy), category "
             f"`{args.category}`, prompt style `{VARIANT.split(':')[1]}`, model `{Path(model_path).name}` "
             f"(random weights); {args.epochs} epoch(s) each, no early stopping; LoRA through `train_lora` with the "
             f"category's settings (lr {settings.learning_rate}, r {settings.lora_r}, {settings.lr_schedule}), "
             f"full fine-tuning of every language-model weight (vision tower, projector frozen); "
             f"{len(contexts):,} training targets (every training position of "
             f"{result['users']:,} users); total {result['total_seconds']:.0f} s.", ""]
    for rule, r in runs.items():
        lines += [f"## {rule}: {r['labels']}", "", f"{r['train_rows']:,} training rows; validation: {r['validation']}.",
                  "", *sft_table(r, settings.learning_rate), ""]
    lines += ["Choice log loss: on the training rows, -log of P(yes)/(P(yes)+P(no)) for the row's answer at the "
              "first answer token; ln 2 = 0.693 is a coin flip. Epoch 0: the base model, no training."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
