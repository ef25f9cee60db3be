"""Yes/no scoring in one forward pass: P(yes) / (P(yes) + P(no)) at the answer position.

``score_shared_prefix`` encodes a user's prefix once and reuses its keys and values for every candidate; the
candidates' suffixes run in batches of similar length. Where the text model's attention is plain causal
(``prefix_attention_applies``), by default on the CPU, the suffixes attend through ``prefix_attention``: all of a
batch's queries on the one cached prefix copy, then each row on its own suffix, merged exactly; rows padded on the
right, logits only at each row's last real token. Otherwise (a sliding window that can bind, Gemma 3's
bidirectional image spans, soft-capped logits, another device) they run on a batch view of the prefix cache with
the model's own mask, left-padded unless a window could bind. Rotary positions and image token types come from
``position_ids`` and ``token_type_inputs``, offset by the prefix. ``score_naive`` is the reference: one full
forward over prefix + suffix per candidate, positions and masks as the model builds them itself. Both read the
same two logits, so they agree to float round-off (tested to 1e-4 on every supported family).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from srec.recommender.encoding import (BIDIRECTIONAL_IMAGE_MODEL_TYPES, EncodedItem, base_model, image_token_types,
                                      mrope_index, pad_batch, position_ids, token_type_inputs, vision_batch)
from srec.recommender.prefix_attention import SharedPrefix, shared_prefix_attention


def _p_yes(logits, yes_id: int, no_id: int) -> np.ndarray:
    import torch  # noqa: PLC0415

    last = logits[:, -1, :].float()
    return torch.sigmoid(last[:, yes_id] - last[:, no_id]).cpu().numpy().astype(np.float64)


# What one more forward call costs, in suffix tokens' worth of compute: batching fewer, equal-length rows saves
# padding but pays this per call. Set from a one-off sweep on the scoring bench's users (tiny model, CPU):
# 0 / 128 / 256 / 512 / 1024 / one batch took 8.2-9.4 / 4.2 / 4.0-4.2 / 4.3-4.5 / 4.7-5.0 / 4.6-5.0 s.
CALL_COST_TOKENS = 256


def plan_batches(lengths: Sequence[int], max_batch: int, call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Split candidates into batches that waste little on padding: sorted by length, cut where the padded tokens
    saved outweigh the cost of another call (optimal for that cost model, by dynamic programming).

    Every row of a batch is padded to its longest suffix, so one batch of 21 suffixes of 106..265 tokens
    computes 21 x 265; two or three batches of similar lengths compute close to the sum of the lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    best = [0.0] + [float("inf")] * n        # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_batch), j):   # rows i..j-1 in one batch, padded to the longest (j-1)
            cost = best[i] + call_cost + (j - i) * lengths[order[j - 1]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return batches[::-1]


def sliding_window(model) -> int | None:
    """The text model's sliding attention window (Mistral, Gemma 2 / 3 ...), None when every layer sees the whole
    sequence."""
    config = base_model(model).config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def answer_logits_to_keep(mask):
    """(``logits_to_keep``, pick) for right-padded rows: the model computes logits only at the rows' last real
    tokens, and ``pick(logits)`` gives them as [B, 1, V], one row each. Per-row positions (a [B, 1] tensor) where
    transformers takes them (``slice_logits_to_keep``); otherwise the distinct last positions for every row
    (a 1-D tensor, [B, k, V] logits), each row then taking its own."""
    import torch  # noqa: PLC0415
    import transformers.modeling_utils as modeling_utils  # noqa: PLC0415

    last = mask.sum(-1) - 1
    if hasattr(modeling_utils, "slice_logits_to_keep"):
        return last[:, None], lambda logits: logits
    kept, column = torch.unique(last, sorted=True, return_inverse=True)
    return kept, lambda logits: logits[torch.arange(len(last), device=logits.device), column][:, None]


def prefix_attention_applies(model, longest: int | None = None) -> bool:
    """Whether the suffixes can run on ``prefix_attention``: the text model's attention is plain causal softmax
    over every earlier token. Not where an image's tokens attend to each other both ways
    (``BIDIRECTIONAL_IMAGE_MODEL_TYPES``: Gemma 3) or attention logits are soft-capped (Gemma 2), nor with a sliding
    window unless every prompt, ``longest`` tokens at most, fits inside it (the window then never binds); those keep
    the batch-view cache and the model's own mask."""
    base = base_model(model)
    if getattr(base.config, "model_type", None) in BIDIRECTIONAL_IMAGE_MODEL_TYPES:
        return False
    if getattr(base.config.get_text_config(), "attn_logit_softcapping", None) is not None:
        return False
    window = sliding_window(model)
    return window is None or (longest is not None and longest < window)


def prefix_attention_by_default(model, device, longest: int | None = None) -> bool:
    """Where ``score_shared_prefix`` uses ``prefix_attention`` unless told: models it applies to, on the CPU (the
    one device it was measured on, and whose flash kernel returns the log-sum-exps it merges by)."""
    import torch  # noqa: PLC0415

    return torch.device(device).type == "cpu" and prefix_attention_applies(model, longest)


def cache_argument(model) -> str:
    """The forward's name for a KV cache: ``cache`` since transformers renamed it (5.25 still takes
    ``past_key_values`` with a warning; 5.40 drops it), ``past_key_values`` before."""
    import inspect  # noqa: PLC0415

    return "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"


def score_shared_prefix(model, prefix_ids: Sequence[int], items: Sequence[EncodedItem], *, yes_id: int, no_id: int,
                        pad_id: int, batch_size: int, device, dtype, prefix_attention: bool | None = None) -> np.ndarray:
    """P(yes)/(P(yes)+P(no)) for every candidate of one user, the prefix encoded once; suffixes batched by
    length (``plan_batches``, at most ``batch_size`` a batch), scores returned in the candidates' order.

    ``prefix_attention``: the suffixes attend through ``prefix_attention`` (one prefix copy, no mask) rather than on
    a batch view of the prefix cache; None (default): ``prefix_attention_by_default``. False: the cache way (the
    benchmark's comparison)."""
    import torch  # noqa: PLC0415
    from transformers import DynamicCache  # noqa: PLC0415

    p = len(prefix_ids)
    out = np.empty(len(items), dtype=np.float64)
    with torch.inference_mode():
        cache_name = cache_argument(model)
        # A cache without the model's config: every layer keeps every prefix position. The model's own would
        # keep only the last window of a sliding-window layer, and the suffixes' keys would then sit at the
        # wrong distance; the sliding window itself is in the attention mask, which the model builds.
        prefix_cache = DynamicCache()
        model(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True, logits_to_keep=1,
              **{cache_name: prefix_cache})
        kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
        # Left padding between the cached prefix and a short suffix would count as distance in a sliding window's
        # mask (it is measured in cache slots), so where the window can bind, suffixes are padded on the right:
        # every real token then sits at its true distance, and the answer is read at each row's last real token.
        window = sliding_window(model)
        longest = p + max(len(it.ids) for it in items)
        if prefix_attention and not prefix_attention_applies(model, longest):
            raise ValueError(f"shared-prefix attention does not apply to {type(base_model(model)).__name__} "
                             "(a sliding window that binds, bidirectional image attention or soft-capped logits)")
        cascade = (prefix_attention_by_default(model, device, longest) if prefix_attention is None
                   else prefix_attention)
        # Right padding where the window can bind, and for the shared-prefix attention (whose causal suffix part
        # then needs no mask); left padding otherwise, so that every row's answer is the last position.
        right = cascade or (window is not None and longest >= window)
        text_config = base_model(model).config.get_text_config()
        for rows in plan_batches([len(it.ids) for it in items], batch_size):
            batch = [items[i] for i in rows]
            b = len(batch)
            ids, mask = pad_batch([it.ids for it in batch], pad_id, left=not right)
            ids, mask = ids.to(device), mask.to(device)
            keep, pick = answer_logits_to_keep(mask) if right else (1, lambda logits: logits)
            positions = position_ids(model, [it.ids for it in batch], [it.vision for it in batch], mask, offset=p,
                                     left=not right)
            vision = vision_batch([it.vision for it in batch], device, dtype)
            if cascade:
                # The suffixes attend to the one prefix copy and to themselves (``prefix_attention``): no cache, no
                # copies of the prefix, no [b, s, p + s] mask.
                shared = SharedPrefix(kv)
                with shared_prefix_attention(text_config):
                    res = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep,
                                shared_prefix=shared, **vision)
                shared.check_ran(len(kv))
            else:
                # A view of the prefix cache per row: each layer concatenates it with the suffix's keys/values into
                # new tensors, so the prefix tensors are never modified and serve every batch.
                cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                                                     for k, v in kv])
                full_mask = torch.cat([torch.ones((b, p), dtype=mask.dtype, device=device), mask], dim=1)
                res = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, **{cache_name: cache},
                            use_cache=True, logits_to_keep=keep, **vision, **token_type_inputs(model, ids, cached=p))
            out[rows] = _p_yes(pick(res.logits), yes_id, no_id)
    return out


def score_naive(model, prefix_ids: Sequence[int], items: Sequence[EncodedItem], *, yes_id: int, no_id: int,
                device, dtype) -> np.ndarray:
    """The reference: one forward over the whole prompt per candidate, no cache."""
    import torch  # noqa: PLC0415

    out = np.empty(len(items), dtype=np.float64)
    with torch.inference_mode():
        for i, it in enumerate(items):
            ids = torch.tensor([list(prefix_ids) + list(it.ids)], device=device)
            vision = vision_batch([it.vision], device, dtype)
            if vision and mrope_index(model) is not None:
                # As the processor would pass them: the model then computes its own 3-D positions, the way
                # ``generate`` does, which is what ``position_ids`` must agree with.
                vision["mm_token_type_ids"] = image_token_types(model, ids)
            res = model(input_ids=ids, use_cache=False, logits_to_keep=1, **vision, **token_type_inputs(model, ids))
            out[i] = _p_yes(res.logits, yes_id, no_id)[0]
    return out


def mean_auc(scores: np.ndarray, n_candidates: int) -> float:
    """Mean AUC over users for score rows of [positive, negatives...] (slot 0 the positive; ties count half)."""
    from srec.metrics import per_user_metrics, rank_counts_from_scores  # noqa: PLC0415

    s = np.asarray(scores, dtype=np.float64).reshape(-1, n_candidates)
    labels = np.zeros_like(s, dtype=bool)
    labels[:, 0] = True
    return float(per_user_metrics(*rank_counts_from_scores(s, labels), ["AUC"])["AUC"].mean())
