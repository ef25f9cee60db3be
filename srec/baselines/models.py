"""Classic sequential recommenders, compact in the style of pmixer/SASRec.pytorch and RecBole.

Both neural models take left-padded item sequences ``[B, L]`` (0 = padding, most recent item last,
``L <= max_len``) and return one hidden state per position ``[B, L, d]``; the state at position t
predicts the item after it. Items are scored by the dot product with the (shared) item embeddings.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class _SequenceModel(nn.Module):
    item_emb: nn.Embedding

    def item_weights(self) -> torch.Tensor:
        """Output embeddings [n_items + 1, d] (row 0 is padding)."""
        return self.item_emb.weight

    @torch.no_grad()
    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        """Scores of every item (column 0 = padding) after each history: [B, n_items + 1]."""
        return self(seqs)[:, -1] @ self.item_weights().T


class _Block(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention + point-wise feed-forward."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden, eps=1e-8), nn.LayerNorm(hidden, eps=1e-8)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.ffn(self.ln2(x))


class SASRec(_SequenceModel):
    """Self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

    Learned positional embeddings counted from the right (the most recent item always sits at
    position ``max_len``, as with pmixer's full left padding), causal attention that also ignores
    padding keys, layer norm, dropout.
    """

    def __init__(self, n_items: int, hidden: int = 64, layers: int = 2, heads: int = 1, dropout: float = 0.5,
                 max_len: int = 50):
        super().__init__()
        self.max_len, self.hidden = max_len, hidden
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len + 1, hidden, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers))
        self.last_ln = nn.LayerNorm(hidden, eps=1e-8)
        for name, p in self.named_parameters():  # as pmixer: xavier for every matrix
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.pos_emb.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        b, n = seqs.shape
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.max_len}")
        pad = seqs == 0
        pos = torch.arange(self.max_len - n + 1, self.max_len + 1, device=seqs.device).expand(b, n)
        x = self.item_emb(seqs) * self.hidden**0.5 + self.pos_emb(pos.masked_fill(pad, 0))
        keep = (~pad).unsqueeze(-1)
        x = self.drop(x) * keep
        eye = torch.eye(n, dtype=torch.bool, device=seqs.device)
        # query i sees keys j <= i that are items; every position sees itself (no all-masked rows)
        mask = (torch.ones(n, n, dtype=torch.bool, device=seqs.device).tril() & (~pad).unsqueeze(1)) | eye
        mask = mask.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.last_ln(x)


class GRU4Rec(_SequenceModel):
    """GRU4Rec (Hidasi et al., ICLR 2016) as in RecBole: embedding -> dropout -> GRU -> dense, full softmax."""

    def __init__(self, n_items: int, hidden: int = 64, layers: int = 1, dropout: float = 0.3):
        super().__init__()
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.emb_drop = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.dense = nn.Linear(hidden, hidden)
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        b, n = seqs.shape
        lengths = (seqs != 0).sum(1)
        n_pad = (n - lengths).unsqueeze(1)
        ar = torch.arange(n, device=seqs.device).unsqueeze(0)
        right = seqs.gather(1, (ar + n_pad) % n)  # left-padded -> right-padded (a row rotation)
        x = self.emb_drop(self.item_emb(right))
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=n)
        out = self.dense(out)
        back = ((ar - n_pad) % n).unsqueeze(-1).expand(-1, -1, out.shape[-1])
        return out.gather(1, back)  # right-padded -> left-padded


class Popularity:
    """Most-popular: an item's score is its number of positives in the window before the target.

    Valid targets are scored with train counts only; test targets with train + valid counts.
    The test interactions themselves are never counted.
    """

    def __init__(self, n_items: int, train: list[np.ndarray], valid_target: np.ndarray):
        flat = np.concatenate(train) if len(train) else np.empty(0, np.int64)
        train_counts = np.bincount(flat.astype(np.int64), minlength=n_items + 1)
        self.counts = {
            "valid": torch.as_tensor(train_counts, dtype=torch.float32),
            "test": torch.as_tensor(train_counts + np.bincount(valid_target, minlength=n_items + 1),
                                    dtype=torch.float32),
        }

    def score_all(self, split: str, batch_size: int) -> torch.Tensor:
        """[batch_size, n_items + 1] scores (a broadcast view of the counts) for ``split``'s targets."""
        return self.counts[split].unsqueeze(0).expand(batch_size, -1)


_TITLE_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script ("crème" is one word)


def title_words(title: str | None) -> set[str]:
    """A title's words: lower-cased runs of letters and digits, 3 characters or more."""
    return {w for w in _TITLE_WORD.findall((title or "").lower()) if len(w) > 2}


class TitleOverlap:
    """Text only, no interaction counts, no training: a candidate scores the summed weight of the title words it
    shares with the titles of the user's last ``history`` items, a word weighing 1 / log(2 + the number of the
    category's items whose title has it) (rare words count more).

    A reference for the MLLM recommender, whose prompt lists the recent items' titles: what such text alone ranks.
    """

    def __init__(self, titles: Sequence[str | None], history: int):
        """``titles[i]``: item index i's title (index 0 is padding; None where an item has none)."""
        rows, cols, vocab = [], [], {}
        for idx, title in enumerate(titles):
            if idx == 0:
                continue
            for w in sorted(title_words(title)):
                rows.append(idx)
                cols.append(vocab.setdefault(w, len(vocab)))
        if not vocab:
            raise ValueError("title_overlap needs item titles: no item's title has a word (3 or more letters or "
                             "digits), so every candidate would score 0; leave title_overlap out of the baseline models")
        self.n_words = len(vocab)
        rows_np, cols_np = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        self.word_weight = torch.as_tensor(1.0 / np.log(2.0 + np.bincount(cols_np)), dtype=torch.float32)
        # item x word incidence, sparse (the full Beauty set: ~12k items x ~10k words, a few words each): scoring
        self.incidence = torch.sparse_coo_tensor(torch.as_tensor(np.stack([rows_np, cols_np])), torch.ones(len(rows)),
                                                 (len(titles), self.n_words), check_invariants=True).coalesce()
        # the same relation as padded word lists (pad: word n_words, weight 0): marking a history's words
        per_item = np.bincount(rows_np, minlength=len(titles))
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(per_item) - per_item, per_item)  # rows are grouped by item
        self.item_words = torch.full((len(titles), int(per_item.max())), self.n_words, dtype=torch.long)
        self.item_words[rows_np, slot] = torch.as_tensor(cols_np)
        self.history = int(history)

    def to(self, device) -> TitleOverlap:
        self.word_weight, self.incidence = self.word_weight.to(device), self.incidence.to(device)
        self.item_words = self.item_words.to(device)
        return self

    @torch.no_grad()
    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        """Scores of every item (column 0 = padding) after each left-padded history ``seqs`` [B, L]: [B, n_items + 1]."""
        recent = seqs[:, -self.history:]
        words = self.item_words[recent].reshape(len(recent), -1)  # padding item 0 has no words
        seen = torch.zeros((len(recent), self.n_words + 1), device=seqs.device).scatter_(1, words, 1.0)
        return torch.sparse.mm(self.incidence, (seen[:, :-1] * self.word_weight).T).T

