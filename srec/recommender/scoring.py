"""Yes/no scoring in one forward pass: P(yes) / (P(yes) + P(no)) at the answer position.

``score_shared_prefix`` encodes a user's prefix once and reuses its KV cache for every candidate: the
candidates' suffixes run in batches on top of a batch view of the prefix cache (left-padded, so every
row's answer position is the last one and only that position's logits are computed). ``score_naive``
is the reference: one full forward over prefix + suffix per candidate. Both read the same two logits,
so they agree to float round-off (tested to 1e-4).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from srec.recommender.encoding import EncodedItem, pad_batch


def _pixel_values(items: Sequence[EncodedItem], dtype, device):
    import torch  # noqa: PLC0415

    pix = [it.pixel_values for it in items if it.pixel_values is not None]
    return torch.cat(pix).to(device=device, dtype=dtype) if pix else None


def _p_yes(logits, yes_id: int, no_id: int) -> np.ndarray:
    import torch  # noqa: PLC0415

    last = logits[:, -1, :].float()
    return torch.sigmoid(last[:, yes_id] - last[:, no_id]).cpu().numpy().astype(np.float64)


def score_shared_prefix(model, prefix_ids: Sequence[int], items: Sequence[EncodedItem], *, yes_id: int, no_id: int,
                        pad_id: int, batch_size: int, device, dtype) -> np.ndarray:
    """P(yes)/(P(yes)+P(no)) for every candidate of one user, the prefix encoded once."""
    import torch  # noqa: PLC0415
    from transformers import DynamicCache  # noqa: PLC0415

    p = len(prefix_ids)
    out = np.empty(len(items), dtype=np.float64)
    with torch.inference_mode():
        pre = model(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in pre.past_key_values.layers]
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            b = len(batch)
            ids, mask = pad_batch([it.ids for it in batch], pad_id, left=True)
            ids, mask = ids.to(device), mask.to(device)
            # A view of the prefix cache per row: the suffix's keys/values are appended to new tensors,
            # so the prefix tensors are shared, never copied or modified.
            cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv])
            full_mask = torch.cat([torch.ones((b, p), dtype=mask.dtype, device=device), mask], dim=1)
            positions = p + (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {}
            pix = _pixel_values(batch, dtype, device)
            if pix is not None:
                kwargs["pixel_values"] = pix
            res = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=1, **kwargs)
            out[start:start + b] = _p_yes(res.logits, yes_id, no_id)
    return out


def score_naive(model, prefix_ids: Sequence[int], items: Sequence[EncodedItem], *, yes_id: int, no_id: int,
                device, dtype) -> np.ndarray:
    """The reference: one forward over the whole prompt per candidate, no cache."""
    import torch  # noqa: PLC0415

    out = np.empty(len(items), dtype=np.float64)
    with torch.inference_mode():
        for i, it in enumerate(items):
            ids = torch.tensor([list(prefix_ids) + list(it.ids)], device=device)
            kwargs = {}
            pix = _pixel_values([it], dtype, device)
            if pix is not None:
                kwargs["pixel_values"] = pix
            res = model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)
            out[i] = _p_yes(res.logits, yes_id, no_id)[0]
    return out


def mean_auc(scores: np.ndarray, n_candidates: int) -> float:
    """Mean AUC over users for score rows of [positive, negatives...] (slot 0 the positive; ties count half)."""
    from srec.metrics import per_user_metrics, rank_counts_from_scores  # noqa: PLC0415

    s = np.asarray(scores, dtype=np.float64).reshape(-1, n_candidates)
    labels = np.zeros_like(s, dtype=bool)
    labels[:, 0] = True
    return float(per_user_metrics(*rank_counts_from_scores(s, labels), ["AUC"])["AUC"].mean())
