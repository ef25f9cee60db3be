"""Settings and the one training loop the neural baselines share."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from srec.baselines.data import SplitData
from srec.baselines.models import GRU4Rec, SASRec

MODELS = ("popularity", "sasrec", "gru4rec", "title_overlap")
LOSSES = ("ce", "bce")


@dataclass
class BaselineSettings:
    """Hyper-parameters of the classic baselines; defaults are tuned for Amazon Beauty 5-core."""

    models: tuple[str, ...] = MODELS
    hidden_size: int = 64
    num_layers: int = 2             # SASRec blocks
    num_heads: int = 1
    dropout: float = 0.5            # SASRec: 0.5 on the sparse Amazon sets (Kang & McAuley)
    gru_layers: int = 1
    gru_dropout: float = 0.3        # GRU4Rec embedding dropout
    max_len: int = 50               # most recent items a model sees
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128           # user sequences per step (every next-item position is a target)
    max_epochs: int = 200
    patience: int = 5               # evaluations without a better valid NDCG@10 before stopping
    eval_every: int = 1             # epochs between validations
    loss: str = "ce"                # 'ce': softmax over all items; 'bce': one sampled negative per position
    seed: int = 2024
    device: str = "auto"            # 'auto' | 'cpu' | 'cuda'
    torch_threads: int | None = None  # None: leave torch's setting alone
    eval_batch_users: int = 256
    title_history: int = 20         # title_overlap: the most recent items whose titles count (the MLLM
                                    # recommender's prompt lists as many by default)

    def __post_init__(self):
        self.models = tuple(self.models)
        unknown = set(self.models) - set(MODELS)
        if unknown:
            raise ValueError(f"unknown baseline models {sorted(unknown)}; known: {MODELS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if min(self.max_len, self.batch_size, self.max_epochs, self.patience, self.eval_every, self.title_history) < 1:
            raise ValueError("max_len, batch_size, max_epochs, patience, eval_every and title_history must be >= 1")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def model_settings(self, model: str) -> dict:
        """The settings that affect ``model`` (stored as JSON in baseline_runs)."""
        d = asdict(self)
        d.pop("models")
        d.pop("torch_threads")
        d.pop("eval_batch_users")
        d["model"] = model
        if model == "popularity":
            return {"model": model, "window": "valid: train counts; test: train + valid counts", "seed": self.seed}
        if model == "title_overlap":
            return {"model": model, "history": self.title_history,
                    "word_weight": "1 / log(2 + items whose title has the word)"}
        if model == "sasrec":
            d.pop("gru_layers"), d.pop("gru_dropout")
        if model == "gru4rec":
            d.pop("num_layers"), d.pop("num_heads"), d.pop("dropout")
        return d


def describe_baseline(model: str, settings: dict, epochs_run: int, best_epoch: int) -> str:
    """One line for a report: what the baseline is and how it was fit (from its baseline_runs row)."""
    if model == "popularity":
        return "positives per item before the target (train counts for valid targets, train + valid for test)"
    if model == "title_overlap":
        return (f"TEXT ONLY, no interactions, no training: the summed rarity weight ({settings.get('word_weight')}) "
                f"of the title words a candidate shares with the full titles of the user's last "
                f"{settings.get('history')} items (the kind of text the MLLM recommender's prompt lists)")
    arch = (f"{settings.get('num_layers')} blocks" if model == "sasrec" else f"{settings.get('gru_layers')} GRU layer(s)")
    return (f"{arch}, hidden {settings.get('hidden_size')}, {settings.get('loss')} loss, last {settings.get('max_len')} "
            f"items; best valid NDCG@10 at epoch {best_epoch} of {epochs_run}")


def build_model(name: str, n_items: int, s: BaselineSettings) -> torch.nn.Module:
    if name == "sasrec":
        return SASRec(n_items, s.hidden_size, s.num_layers, s.num_heads, s.dropout, s.max_len)
    if name == "gru4rec":
        return GRU4Rec(n_items, s.hidden_size, s.gru_layers, s.gru_dropout)
    raise ValueError(f"not a neural baseline: {name!r}")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: int = 32) -> list[np.ndarray]:
    """Shuffled batches of trainable users, length-bucketed inside chunks of ``bucket`` batches (less padding)."""
    users = rng.permutation(np.flatnonzero(lengths >= 2))
    out = []
    chunk = batch_size * bucket
    for start in range(0, len(users), chunk):
        part = users[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [out[i] for i in rng.permutation(len(out))]


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of ``h @ w.T`` against ``y``, computed in chunks of rows.

    Forward and backward in one pass per chunk, so the [P, n_items] logits never exist at once: on a
    CPU the full-softmax loss is bound by memory traffic, and a chunk of logits stays in cache.
    """

    @staticmethod
    def forward(ctx, h, w, y, chunk: int = 128):
        n = h.shape[0]
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
        loss = h.new_zeros(())
        for s in range(0, n, chunk):
            hc, yc = h[s:s + chunk], y[s:s + chunk]
            p = hc @ w.T
            target_logit = p.gather(1, yc.unsqueeze(1)).squeeze(1)
            top = p.amax(1, keepdim=True)
            p.sub_(top).exp_()
            total = p.sum(1, keepdim=True)
            loss += (top.squeeze(1) + total.log().squeeze(1) - target_logit).sum()
            p.div_(total)                                        # softmax
            p[torch.arange(len(yc), device=p.device), yc] -= 1   # d loss / d logits
            grad_h[s:s + chunk] = p @ w
            grad_w.addmm_(p.T, hc)
        ctx.save_for_backward(grad_h.div_(n), grad_w.div_(n))
        return loss / n

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, grad_w * grad, None, None


def sequence_loss(model, inputs: torch.Tensor, targets: torch.Tensor, loss: str, generator: torch.Generator | None = None):
    """Next-item loss at every non-padding position: full softmax CE, or BCE with one sampled negative."""
    hidden = model(inputs)
    mask = targets > 0
    h, y = hidden[mask], targets[mask]
    weights = model.item_weights()
    if loss == "ce":  # logits only at real positions, over the real items (column 0 = padding left out)
        if torch.is_grad_enabled() and h.device.type == "cpu":
            return _LinearCrossEntropy.apply(h, weights[1:], y - 1)
        return F.cross_entropy(h @ weights[1:].T, y - 1)
    n_items = weights.shape[0] - 1
    neg = torch.randint(1, n_items + 1, y.shape, device=y.device, generator=generator)
    neg = torch.where(neg == y, neg % n_items + 1, neg)
    pos_logit = (h * weights[y]).sum(-1)
    neg_logit = (h * weights[neg]).sum(-1)
    return F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + \
        F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    best_valid_ndcg10: float
    train_seconds: float
    history: list[tuple[int, float, float]]  # (epoch, mean train loss, valid NDCG@10 or nan)


def fit(
    model: torch.nn.Module,
    data: SplitData,
    s: BaselineSettings,
    valid_fn: Callable[[torch.nn.Module], float],
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
    name: str = "model",
) -> FitResult:
    """Adam on batches of train sequences; early stopping on ``valid_fn`` (valid NDCG@10); best weights restored."""
    log = log or (lambda _msg: None)
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator(device=device).manual_seed(s.seed)
    matrix = torch.as_tensor(data.train_matrix(s.max_len))
    lengths = (matrix != 0).sum(1).numpy()
    if (lengths >= 2).sum() == 0:
        raise ValueError(f"{data.category}: no user has two train items; nothing to train {name} on")
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=s.weight_decay, fused=True)
    best, best_epoch, best_state, bad = -np.inf, 0, copy.deepcopy(model.state_dict()), 0
    history, epoch, t0 = [], 0, time.perf_counter()
    for epoch in range(1, s.max_epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for rows in _batches(lengths, s.batch_size, rng):
            width = int(lengths[rows].max())
            batch = matrix[torch.as_tensor(rows)][:, -width:].to(device)
            loss = sequence_loss(model, batch[:, :-1], batch[:, 1:], s.loss, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        ndcg = float("nan")
        if epoch % s.eval_every == 0 or epoch == s.max_epochs:
            model.eval()
            ndcg = float(valid_fn(model))
            if ndcg > best:
                best, best_epoch, bad = ndcg, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
        history.append((epoch, total / max(steps, 1), ndcg))
        log(f"{name} epoch {epoch}: loss {total / max(steps, 1):.4f} valid ndcg@10 {ndcg:.4f} "
            f"(best {best:.4f} @ {best_epoch}) {time.perf_counter() - t0:.0f}s")
        if bad >= s.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(epoch, best_epoch, float(best), time.perf_counter() - t0, history)
