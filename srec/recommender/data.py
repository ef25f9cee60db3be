"""What the recommender's prompts are made of, read from the tables: items, users' targets, candidates.

- Items (``load_items``): title, brand, categories, description (``raw_items``), the fused caption
  (``item_captions``, status ok) and the normalised image (``item_images``, status ok).
- User contexts (``load_user_contexts``): one per (user, split, target) of ``user_preferences``: the
  profile, the history before the target and the summary of each preference mode. Split ``train`` rows
  are the SFT targets (each user's last training positives); ``valid`` and ``test`` are the eval targets.
- SFT examples (``plan_sft_examples``): per training target the positive ("Yes.") and
  ``negatives_per_positive`` negatives ("No."): the user's explicit low-rated training items first, where
  ratings exist, then items sampled uniformly (seeded per user and target) from the items the user never
  interacted with.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import duckdb
import numpy as np

from srec.db import ensure_tables
from srec.prompts import clean_text, cut_text, item_text
from srec.recommender.encoding import ItemView, UserView
from srec.recommender.settings import RecommenderSettings, Variant


class RecommenderInputError(ValueError):
    """An upstream table lacks what the recommender needs; the message names it and what to run."""


@dataclass(frozen=True)
class ItemInfo:
    title: str | None
    brand: str | None
    categories: str | None
    description: str | None
    caption: str | None        # the fused caption (NULL when captioning failed)
    image_path: str | None     # the normalised image (NULL unless the image is ok)


@dataclass(frozen=True)
class UserContext:
    user_id: str
    split: str
    target_seq_index: int
    target_item: str
    profile: str
    history_ids: tuple[str, ...]
    summaries: Mapping[str, str | None]  # mode -> summary (None: that summary failed)






def load_items(con: duckdb.DuckDBPyConnection, category: str) -> dict[str, ItemInfo]:
    ensure_tables(con, ["interactions", "raw_items", "item_captions", "item_images"])
    rows = con.execute(
        """
        WITH ids AS (SELECT DISTINCT item_id FROM interactions WHERE category = ?),
        r AS (SELECT DISTINCT ON (item_id) item_id, title, brand, categories, description FROM raw_items
              WHERE category = ? ORDER BY item_id, source_file, source_line),
        c AS (SELECT item_id, caption FROM item_captions WHERE category = ? AND status = 'ok'),
        g AS (SELECT item_id, image_path FROM item_images WHERE category = ? AND status = 'ok')
        SELECT ids.item_id, r.title, r.brand, r.categories, r.description, c.caption, g.image_path
        FROM ids LEFT JOIN r USING (item_id) LEFT JOIN c USING (item_id) LEFT JOIN g USING (item_id)
        ORDER BY ids.item_id
        """,
        [category] * 4,
    ).fetchall()
    return {r[0]: ItemInfo(*(clean_text(x) for x in r[1:6]), r[6]) for r in rows}


def item_view(info: ItemInfo, modality: str, settings: RecommenderSettings) -> ItemView:
    """The candidate as the prompt shows it: fused (image + caption), text (item text) or image only."""
    n = settings.max_item_chars
    if modality == "image":
        return ItemView("(shown in the image)" if info.image_path else "(no image available)", info.image_path)
    if modality == "fused" and info.caption:
        whole = f"Title: {info.title or '(no title)'}\nDescription: {info.caption}"
    else:  # the item's own text (also the fused view of an item whose captioning failed)
        whole = item_text(info.title, info.brand, info.categories, info.description, max_description_chars=10**9)
    return ItemView(cut_text(whole, n), info.image_path if modality == "fused" else None, cut=len(whole) > n)


def history_line(info: ItemInfo | None, settings: RecommenderSettings) -> str:
    title = (info.title if info else None) or "(no title)"
    return cut_text(title, settings.max_title_chars)


def load_user_contexts(con: duckdb.DuckDBPyConnection, category: str, splits: Iterable[str],
                       users: Iterable[str] | None = None) -> list[UserContext]:
    """One context per (user, split, target) in ``user_preferences``, ordered by user, split, target."""
    ensure_tables(con, ["user_preferences", "interactions"])
    splits = list(splits)
    rows = con.execute(
        f"""
        SELECT p.user_id, p.split, p.target_seq_index, i.item_id, p.mode, p.status, p.summary, p.profile,
               p.history_item_ids
        FROM user_preferences p
        JOIN interactions i ON i.category = p.category AND i.user_id = p.user_id
             AND i.seq_index = p.target_seq_index AND i.label = 1
        WHERE p.category = ? AND p.split IN ({', '.join('?' * len(splits))})
        ORDER BY p.user_id, p.split, p.target_seq_index, p.mode
        """,
        [category, *splits],
    ).fetchall()
    wanted = set(users) if users is not None else None
    out: list[UserContext] = []
    current: dict | None = None
    for user, split, seq, item, mode, status, summary, profile, hist in rows:
        if wanted is not None and user not in wanted:
            continue
        key = (user, split, int(seq))
        if current is None or current["key"] != key:
            if current is not None:
                out.append(_context(current))
            current = {"key": key, "item": item, "profile": profile, "history": tuple(json.loads(hist)),
                       "summaries": {}}
        current["summaries"][mode] = summary if status == "ok" else None
    if current is not None:
        out.append(_context(current))
    return out


def _context(c: dict) -> UserContext:
    user, split, seq = c["key"]
    return UserContext(user, split, seq, c["item"], c["profile"], c["history"], dict(c["summaries"]))


def user_view(ctx: UserContext, preference: str, items: Mapping[str, ItemInfo],
              settings: RecommenderSettings) -> UserView:
    summary = None
    if preference != "none":
        if preference not in ctx.summaries:
            raise RecommenderInputError(
                f"user_preferences has no '{preference}' summaries (user {ctx.user_id!r}, split {ctx.split!r}); "
                f"materialize user_preferences with mode '{preference}' in its modes, or drop the variants that "
                "need it")
        summary = ctx.summaries[preference] or "(no summary: its generation failed)"
    history = tuple(history_line(items.get(i), settings) for i in ctx.history_ids[-settings.history_items:])
    return UserView(ctx.profile, summary, history)


# --- SFT examples -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedExample:
    context: UserContext
    item_id: str
    label: int                 # 1: the target ("Yes."), 0: a negative ("No.")
    label_source: str          # 'target' | 'low_rating' | 'sampled'


def _rng(seed: int, *parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\x00".join(map(str, (seed, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def plan_sft_examples(con: duckdb.DuckDBPyConnection, category: str, settings: RecommenderSettings,
                      seed: int) -> tuple[list[PlannedExample], dict]:
    """Positives and negatives for every training target; deterministic for (data, settings, seed)."""
    contexts = load_user_contexts(con, category, ["train"])
    if not contexts:
        raise RecommenderInputError(
            f"user_preferences has no 'train' targets for {category!r}: materialize user_preferences with "
            "train_targets >= 1 (the SFT targets) first")
    all_items = np.array(sorted(r[0] for r in con.execute(
        "SELECT DISTINCT item_id FROM interactions WHERE category = ?", [category]).fetchall()), dtype=object)
    touched: dict[str, set[str]] = {}
    for user, item in con.execute("SELECT user_id, item_id FROM interactions WHERE category = ?",
                                  [category]).fetchall():
        touched.setdefault(user, set()).add(item)
    low_rated: dict[str, list[str]] = {}
    for user, item in con.execute(
            "SELECT user_id, item_id FROM interactions WHERE category = ? AND label = 0 AND split = 'train' "
            "ORDER BY user_id, timestamp NULLS LAST, position, item_id", [category]).fetchall():
        low_rated.setdefault(user, []).append(item)
    k = settings.negatives_per_positive
    planned: list[PlannedExample] = []
    counts = {"targets": 0, "positives": 0, "low_rating": 0, "sampled": 0}
    for ctx in contexts:
        counts["targets"] += 1
        planned.append(PlannedExample(ctx, ctx.target_item, 1, "target"))
        counts["positives"] += 1
        rng = _rng(seed, "sft", ctx.user_id, ctx.target_seq_index)
        explicit = list(low_rated.get(ctx.user_id, ()))
        rng.shuffle(explicit)
        negs = [(i, "low_rating") for i in explicit[:k]]
        need = k - len(negs)
        if need:
            seen = touched.get(ctx.user_id, set())
            if len(all_items) - len(seen) < need:
                raise RecommenderInputError(f"user {ctx.user_id!r} left fewer than {need} untouched items to sample "
                                            "negatives from")
            picked: list[str] = []
            while len(picked) < need:  # rejection sampling: users touch a tiny share of the items
                for i in rng.choice(all_items, size=4 * need + 8):
                    if i not in seen and i not in picked:
                        picked.append(i)
                        if len(picked) == need:
                            break
            negs += [(i, "sampled") for i in picked]
        for item, source in negs:
            planned.append(PlannedExample(ctx, item, 0, source))
            counts[source] += 1
    return planned, counts


def load_candidates(con: duckdb.DuckDBPyConnection, category: str, split: str, protocol: str
                    ) -> dict[str, list[tuple[int, str]]]:
    """user -> [(slot, item_id)] in slot order (slot 0 the positive), from ``eval_candidates``."""
    out: dict[str, list[tuple[int, str]]] = {}
    for user, slot, item in con.execute(
            "SELECT user_id, slot, item_id FROM eval_candidates WHERE category = ? AND split = ? AND protocol = ? "
            "ORDER BY user_id, slot", [category, split, protocol]).fetchall():
        out.setdefault(user, []).append((int(slot), item))
    return out


def variant_needs(variants: Iterable[Variant]) -> set[str]:
    """Preference modes the variants read from user_preferences."""
    return {v.preference for v in variants if v.preference != "none"}
