"""Would a pretrained tiny base pass the tiny-model AUC check? A language-model-pretrained base, probed.

The issue's tiny-model check (SFT lifts test AUC on 1+20 to >= 0.60) fails on the random-weight tiny LLaVA
(``sft_learnability.py``: it cannot learn the yes/no choice). This asks whether the missing piece is
knowledge a random model cannot have. On a copy of the demo's database (run ``scripts/demo.sh`` first):

1. pretrain: a copy of the tiny LLaVA's language model (every weight; vision tower and projector frozen) is
   trained as a language model on the purchase sequences of the Amazon Beauty 5-core users (``../shared/data``)
   who are NOT in the bundled sample, each written the way the recommender's prompt lists a history
   ("Recent purchases, oldest first:\\n1. <title>\\n..."; the last 12 items, titles cut as the prompt cuts them);
2. language-model probe, on the random base and on the pretrained one: for the validation users' valid 1+20
   candidates (the users early stopping scores), the log-likelihood of the candidate's title as the next line
   of the user's last ``history_items`` titles (``cond``), the same without the history (``uncond``) and their
   difference (``pmi``); mean AUC of each as a ranking score: does the base *know* which item comes next?
3. SFT on the pretrained base: ``sft_examples`` rebuilt with it, then LoRA with the category's recommender
   settings through ``train_lora`` and full fine-tuning (``sft_learnability.full_finetune``), per epoch the
   choice log loss and validation AUC: can the yes/no answer *read out* what the base knows?

Not a shipped model: the pretraining corpus is other users of the same category (none of the sample's users,
so none of their valid or test items as theirs), which the classic baselines in the report never see.
Results: ``bench/results/pretrained_base_probe.{json,md}``. About 17 minutes on 2 cores with the defaults.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "pretrained_base_probe"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from srec.paths import SHARED_DATA_DIR  # noqa: E402

DATA = SHARED_DATA_DIR / "amazon-beauty"
VARIANT = "lora:fused+recurrent"
HEADER = "Recent purchases, oldest first:\n"
DOC_ITEMS = 12


def history_text(titles: list[str]) -> str:
    return HEADER + "\n".join(f"{k + 1}. {t}" for k, t in enumerate(titles))


def corpus(con, category: str, max_title_chars: int) -> tuple[list[str], dict]:
    """Documents from the shared Beauty users absent from the category's raw reviews (the bundled sample)."""
    import csv

    from srec.prompts import cut_text

    sample_users = {u for (u,) in con.execute("SELECT DISTINCT user_id FROM raw_reviews WHERE category = ?",
                                              [category]).fetchall()}
    with open(DATA / "item_titles.csv", newline="", encoding="utf-8") as f:
        titles = {r["item_id"]: r["title"] for r in csv.DictReader(f)}
    docs, skipped = [], 0
    with open(DATA / "user_sequence.txt", encoding="utf-8") as f:
        for line in f:
            user, *items = line.split()
            if user in sample_users:
                skipped += 1
                continue
            docs.append(history_text([cut_text(titles.get(i) or "(no title)", max_title_chars)
                                      for i in items[-DOC_ITEMS:]]))
    return docs, {"documents": len(docs), "sample_users_excluded": skipped, "source": str(DATA)}


def pretrain(model, tokenizer, docs: list[str], epochs: int, lr: float, seed: int, log) -> list[dict]:
    """Language-model loss on every token of every document; length-sorted batches of 16 in a seeded order."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    ids = [tokenizer(d)["input_ids"] for d in docs]
    frozen = ("vision_tower", "multi_modal_projector")
    for name, p in model.named_parameters():
        p.requires_grad = not any(f in name for f in frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = sorted(range(len(ids)), key=lambda j: len(ids[j]))
    batches = [order[s:s + 16] for s in range(0, len(order), 16)]
    rng = np.random.default_rng(seed)
    history = []
    model.train()
    for epoch in range(1, epochs + 1):
        t0, losses = time.perf_counter(), []
        for b in rng.permutation(len(batches)):
            rows = [ids[j] for j in batches[b]]
            width = max(map(len, rows))
            x = torch.full((len(rows), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                x[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            loss = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        history.append({"epoch": epoch, "lm_loss": round(float(np.mean(losses)), 4),
                        "seconds": round(time.perf_counter() - t0, 1)})
        log(f"pretraining epoch {epoch}: {json.dumps(history[-1])}")
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    return history


def lm_probe(model, tokenizer, con, category: str, users: list[str], settings, items) -> dict:
    """Mean AUC over users of the candidates' title log-likelihood after the history (cond), alone (uncond),
    and of their difference (pmi), on the valid 1+20 candidates."""
    import numpy as np
    import torch

    from srec.recommender.data import history_line, load_candidates, load_user_contexts
    from srec.recommender.scoring import mean_auc

    candidates = load_candidates(con, category, "valid", "1+20")
    contexts = {c.user_id: c for c in load_user_contexts(con, category, ["valid"], users=users)}

    def logp(prefix: str, lines: list[str]) -> np.ndarray:
        head = tokenizer(prefix)["input_ids"]
        out = []
        with torch.inference_mode():
            for line in lines:
                tail = tokenizer(line)["input_ids"]
                logits = model(input_ids=torch.tensor([head + tail])).logits[0, len(head) - 1:-1]
                out.append(logits.float().log_softmax(-1)[torch.arange(len(tail)), torch.tensor(tail)].sum().item())
        return np.array(out)

    cond, uncond = [], []
    for user in users:
        ctx = contexts[user]
        shown = [history_line(items.get(i), settings) for i in ctx.history_ids[-settings.history_items:]]
        cands = [history_line(items.get(i), settings) for _, i in candidates[user]]
        cond.append(logp(history_text(shown) + "\n", [f"{len(shown) + 1}. {t}" for t in cands]))
        uncond.append(logp(HEADER, [f"1. {t}" for t in cands]))
    cond_a, uncond_a = np.array(cond), np.array(uncond)
    return {"users": len(users), "cond_auc": round(mean_auc(cond_a, 21), 4),
            "uncond_auc": round(mean_auc(uncond_a, 21), 4), "pmi_auc": round(mean_auc(cond_a - uncond_a, 21), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default=str(ROOT / "data" / "srec.duckdb"))
    ap.add_argument("--category", default="beauty")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--sft-epochs", type=int, default=3)
    ap.add_argument("--full-lr", type=float, default=3e-4)
    ap.add_argument("--tag", default="", help="suffix of the results files' names (pretrained_base_probe<tag>.*)")
    args = ap.parse_args()
    from sft_learnability import demo_copy, lora_and_full, sft_table
    from srec.models.runner import LoadedModel, RunnerSettings
    from srec.recommender import pipeline as P
    from srec.recommender.data import load_items
    from srec.recommender.settings import Variant

    started = time.perf_counter()
    con, cfg, settings = demo_copy(args.db, WORK, args.category, args.sft_epochs, fresh=True)
    variant = Variant.parse(VARIANT)
    (random_base,) = con.execute("SELECT any_value(model) FROM sft_examples WHERE category = ? AND style = ?",
                                 [args.category, variant.style]).fetchone()
    if random_base is None:
        sys.exit(f"{args.db} has no {variant.style} sft_examples for {args.category!r}: run scripts/demo.sh first")
    items = load_items(con, args.category)
    users = P.validation_users(con, args.category, settings, cfg.seed)
    say = lambda m: print(m, flush=True)  # noqa: E731

    base = LoadedModel(RunnerSettings(model=random_base, device="cpu", dtype="float32"))
    probe_random = lm_probe(base.model, base.tokenizer, con, args.category, users, settings, items)
    say(f"language-model probe, random base: {json.dumps(probe_random)}")
    docs, corpus_info = corpus(con, args.category, settings.max_title_chars)
    t0 = time.perf_counter()
    pre_history = pretrain(base.model, base.tokenizer, docs, args.pretrain_epochs, args.pretrain_lr, cfg.seed, say)
    pretrain_seconds = time.perf_counter() - t0
    pretrained = WORK / "pretrained-tiny-llava"
    base.model.save_pretrained(pretrained)
    base.processor.save_pretrained(pretrained)
    probe_pretrained = lm_probe(base.model, base.tokenizer, con, args.category, users, settings, items)
    say(f"language-model probe, pretrained base: {json.dumps(probe_pretrained)}")

    # The SFT rows rebuilt with the pretrained base, so they (and their lineage columns) name the model trained.
    P.build_sft_examples(con, args.category, LoadedModel(RunnerSettings(model=str(pretrained), device="cpu",
                                                                        dtype="float32")),
                         settings, seed=cfg.seed, log=lambda m: None)
    runs = lora_and_full(con, args.category, str(pretrained), settings, cfg.seed, items, WORK / "lora", args.full_lr,
                         log=say)

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/pretrained_base_probe.py " + " ".join(sys.argv[1:]),
        "database": args.db, "category": args.category, "variant": VARIANT, "random_base": random_base,
        "corpus": corpus_info, "pretraining": {"epochs": pre_history, "learning_rate": args.pretrain_lr,
                                               "seconds": round(pretrain_seconds, 1)},
        "lm_probe": {"random_base": probe_random, "pretrained_base": probe_pretrained},
        "settings": settings.training_json(), "train_rows": runs["train_rows"],
        "coin_flip_log_loss": round(math.log(2), 4), "lora": runs["lora"], "full_finetune": runs["full_finetune"],
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"pretrained_base_probe{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    pr, pp = probe_random, probe_pretrained
    lines = [
        "# A language-model-pretrained tiny base: does it know the next item, and can yes/no SFT read it out?", "",
        f"{result['date']}; `{result['command'].strip()}`; database `{Path(args.db).name}` (a copy), category "
        f"`{args.category}`, variant `{VARIANT}`; validation: 1+20 valid candidates of {len(users)} seeded users "
        f"(the users early stopping scores); total {result['total_seconds']:.0f} s. Not a shipped model.", "",
        f"Pretraining: the random tiny LLaVA's language model, every weight, {args.pretrain_epochs} epochs, AdamW lr "
        f"{args.pretrain_lr}, on {corpus_info['documents']:,} Amazon Beauty 5-core users' last {DOC_ITEMS} titles "
        f"written as the prompt's history list ({corpus_info['sample_users_excluded']:,} users of the bundled "
        f"sample excluded); LM loss by epoch {', '.join(str(h['lm_loss']) for h in pre_history)}; "
        f"{pretrain_seconds:.0f} s.", "",
        "## Language-model probe (ranking by the candidate title's log-likelihood as the history's next line)", "",
        "| base | cond AUC | uncond AUC | pmi AUC |", "|---|---:|---:|---:|",
        f"| random weights | {pr['cond_auc']:.4f} | {pr['uncond_auc']:.4f} | {pr['pmi_auc']:.4f} |",
        f"| pretrained | {pp['cond_auc']:.4f} | {pp['uncond_auc']:.4f} | {pp['pmi_auc']:.4f} |", "",
        "## Yes/no SFT on the pretrained base (the demo's rows rebuilt with it)", "",
        f"Choice log loss: -log P(row's answer) with P(yes)/(P(yes)+P(no)) at the first answer token, on the "
        f"{runs['train_rows']:,} training rows; {math.log(2):.3f} (ln 2) is a coin flip. Epoch 0: the base, "
        "zero-shot.", ""]
    lines += sft_table(runs, settings.learning_rate)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
