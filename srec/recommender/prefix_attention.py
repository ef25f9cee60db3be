"""Shared-prefix ("cascade") attention for scoring a user's candidates on one cached prompt prefix.

A batch of b suffixes on one prefix of p tokens: the plain way hands the model a cache whose prefix keys and values
are copied b times (every layer concatenates them with the suffix's into new [b, heads, p + s, d] tensors) and a
[b, 1, s, p + s] mask that transformers materialises for every call; the attention kernel then reads the same
prefix b times. Here attention is split in two exact parts, merged by their log-sum-exps (as in Hydragen /
FlashInfer's cascade attention):

* every suffix query of the batch against the prefix, as one sequence of b * s queries on the single prefix copy:
  no mask (a suffix sees the whole prefix), no copy;
* each row's queries against its own suffix keys, causal; the rows are padded on the right, so no mask at all.

softmax over [prefix; suffix] = (o1 * e^(lse1) + o2 * e^(lse2)) / (e^(lse1) + e^(lse2)), so the result equals the
plain way's to float round-off. The layer's own q/k/v projections, rotary embedding and output projection run as
usual: this replaces only the attention function of the text model (transformers' ``AttentionInterface``), and only
inside ``shared_prefix_attention(...)``, for models whose text attention is plain causal (no sliding window that
binds, no bidirectional image spans, no logit soft-capping or attention sinks).

The scorer uses it by default on the CPU, where torch's flash kernel returns the log-sum-exps and where it was
measured (``bench/recommender_bench.py``). Elsewhere it takes the plain float32 path only when asked for; GPU
figures for either way are unmeasured.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

ATTENTION_NAME = "srec_shared_prefix"


@dataclass
class SharedPrefix:
    """What the suffix calls' attention needs besides the layer's own q/k/v: the prefix's keys and values per
    layer ([1, kv_heads, p, d] each, as the prefix pass cached them). The suffixes must be padded on the right."""
    kv: list
    calls: int = 0

    def layer(self, layer_idx: int):
        self.calls += 1
        return self.kv[layer_idx]

    def check_ran(self, layers: int) -> None:
        """Every layer's attention went through ``shared_prefix_attention_forward``: a model whose attention read
        another config's implementation would have attended to the suffix alone, without any error."""
        if self.calls != layers:
            raise RuntimeError(f"{ATTENTION_NAME!r} attention ran in {self.calls} of the text model's {layers} layers; "
                               "this model's attention does not follow its text config")


def attention_with_lse(query, key, value, *, causal: bool, scale: float):
    """Softmax attention and its log-sum-exp per query: [B, H, Q, D], [B, H, Q] (float32); ``causal`` aligns the
    first query with the first key (Q == K here). CPU: torch's flash kernel, which returns both; elsewhere
    ``attention_with_lse_math`` (on a GPU, fused kernels that return log-sum-exps are private torch ops: not used
    unmeasured)."""
    import torch  # noqa: PLC0415

    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, scale=scale)
    return attention_with_lse_math(query, key, value, causal=causal, scale=scale)


# Most float32 scores the plain path holds at once (query rows are taken in chunks under it).
MATH_SCORES_BYTES = 256 << 20


def attention_with_lse_math(query, key, value, *, causal: bool, scale: float):
    """The same in plain float32 tensor ops, on any device; the queries in chunks of at most ``MATH_SCORES_BYTES``
    of scores."""
    import torch  # noqa: PLC0415

    b, h, q, _ = query.shape
    k = key.shape[-2]
    rows = max(1, MATH_SCORES_BYTES // (4 * b * h * k))
    outs, lses = [], []
    for start in range(0, q, rows):
        part = query[:, :, start:start + rows].float()
        scores = torch.matmul(part, key.float().transpose(-1, -2)) * scale
        if causal:  # query row start + i sees keys 0 .. start + i
            later = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(start + 1)
            scores = scores.masked_fill(later, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), value.float()).to(query.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def shared_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                    shared_prefix: SharedPrefix | None = None, **kwargs):
    """transformers attention function (``AttentionInterface``): query [b, H, s, d]; key/value [b, Hkv, s, d], the
    suffix's only (the call runs without a cache). Returns [b, s, H, d] as ``sdpa_attention_forward`` does."""
    import torch  # noqa: PLC0415

    if shared_prefix is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention ran without its shared_prefix argument: the model "
                           f"({type(module).__name__}) did not pass the forward's keyword arguments on to its attention")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"{ATTENTION_NAME!r} attention does not implement {name} ({type(module).__name__})")
    if attention_mask is not None:
        raise RuntimeError(f"{ATTENTION_NAME!r} attention got a mask from the model; it builds its own")
    if dropout:
        raise RuntimeError(f"{ATTENTION_NAME!r} attention is for inference (dropout {dropout})")
    b, heads, s, d = query.shape
    prefix_k, prefix_v = shared_prefix.layer(module.layer_idx)
    window = kwargs.get("sliding_window")
    if window is not None and prefix_k.shape[2] + s >= window:  # a key could fall out of the window
        raise RuntimeError(f"{ATTENTION_NAME!r} attention does not implement a sliding window that binds "
                           f"({prefix_k.shape[2]} + {s} tokens, window {window}; {type(module).__name__})")
    kv_heads = prefix_k.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    # Part 1: all b*s queries on the one prefix copy. Query head i reads kv head i // group (transformers'
    # repeat_kv order), so a kv head's queries are its group's heads over all rows: [1, Hkv, group*b*s, d].
    folded = query.view(b, kv_heads, group, s, d).permute(1, 2, 0, 3, 4).reshape(1, kv_heads, group * b * s, d)
    out1, lse1 = attention_with_lse(folded, prefix_k, prefix_v, causal=False, scale=scale)
    out1 = out1.view(kv_heads, group, b, s, d).permute(2, 0, 1, 3, 4).reshape(b, heads, s, d)
    lse1 = lse1.view(kv_heads, group, b, s).permute(2, 0, 1, 3).reshape(b, heads, s)
    # Part 2: each row on its own suffix, causal. The rows are padded on the right, so a real token's causal past
    # holds no padding and no mask is needed (padding positions compute values nobody reads).
    if group > 1:
        key = key[:, :, None].expand(b, kv_heads, group, s, d).reshape(b, heads, s, d)
        value = value[:, :, None].expand(b, kv_heads, group, s, d).reshape(b, heads, s, d)
    out2, lse2 = attention_with_lse(query, key, value, causal=True, scale=scale)
    top = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - top)[..., None], torch.exp(lse2 - top)[..., None]
    out = (out1.float() * w1 + out2.float() * w2) / (w1 + w2)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@functools.cache
def register() -> None:
    """Once per process: ``shared_prefix_attention`` enters for every suffix batch."""
    from transformers import AttentionInterface  # noqa: PLC0415

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention_forward)


@contextlib.contextmanager
def shared_prefix_attention(text_config):
    """The text model's attention is ``shared_prefix_attention_forward`` inside the block (and transformers builds no
    mask for it: the name is not in its mask interface), what it was before afterwards."""
    register()
    before = text_config._attn_implementation
    text_config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        text_config._attn_implementation = before
