"""LoRA / QLoRA supervised fine-tuning of the recommender on yes/no answers.

- LoRA on every linear layer of the language model; the vision tower, the multimodal projector and
  ``lm_head`` stay frozen and unadapted (``lora_target_modules``).
- The loss is on the answer tokens only ("Yes." / "No." and the end-of-turn token the chat template puts
  after them): rows are left-padded so the answers end every row, and only the last positions' logits
  are computed (``answer_loss``). Each epoch also records how well the yes/no choice itself is fit
  (``choice_stats``), which the answer loss alone hides.
- AdamW, warmup then a linear / cosine / constant schedule, gradient accumulation, gradient clipping,
  a seed, and early stopping on the validation AUC (scored like the test, one forward pass per
  candidate on a shared prefix).
- Resumable: after every epoch one folder, ``work_dir/checkpoint`` (the last adapter, the best adapter so far,
  and the optimizer, scheduler, RNG and progress), is replaced whole by a rename; a rerun with the same run
  key resumes there.
- Images: the candidate's processor inputs (``EncodedItem.vision``) are batched by ``vision_batch`` and the
  rotary positions come from ``position_ids``, so LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / 2.5-VL / 3-VL and Idefics3 /
  SmolVLM style models train and score alike.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from srec.recommender.encoding import EncodedItem, pad_batch, position_ids, token_type_inputs, vision_batch
from srec.recommender.settings import RecommenderSettings

# Module-name parts of the parts LoRA never touches: vision encoders and projectors of the common MLLMs
# (LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3 / SmolVLM, PaliGemma ...) and the output head.
FROZEN_PARTS = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector", "connector",
                "merger", "image_newline", "lm_head", "vision_embed", "embed_vision")


def lora_target_modules(model) -> list[str]:
    """Full names of the language model's linear layers (bitsandbytes 4/8-bit linears included)."""
    import torch  # noqa: PLC0415

    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p in FROZEN_PARTS for p in parts):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no language-model linear layer to adapt")
    return names


@dataclass
class TrainRow:
    """One training example, prefix + suffix + answer, kept as the parts it was made of: a target's rows share one
    prefix list and an item's rows its suffix list (``make_row``), where joined copies would be most of a training
    set's memory (LLaVA-NeXT's candidate suffixes run to about 2,900 ids)."""
    prefix: Sequence[int]      # the user's prompt prefix, which a batch encodes once for the rows that share it;
                               # empty: not known (the row batches whole)
    suffix: Sequence[int]      # the candidate part, up to the answer
    answer: Sequence[int]      # the loss covers only these
    vision: dict | None = None  # the candidate's image inputs (EncodedItem.vision)

    @property
    def ids(self) -> list[int]:
        """The whole row (a new list)."""
        return [*self.prefix, *self.suffix, *self.answer]

    @property
    def length(self) -> int:
        return len(self.prefix) + len(self.suffix) + len(self.answer)

    @property
    def prefix_len(self) -> int:
        return len(self.prefix)

    @property
    def answer_len(self) -> int:
        return len(self.answer)


def make_row(prefix_ids: Sequence[int], item: EncodedItem, answer_ids: Sequence[int]) -> TrainRow:
    return TrainRow(prefix_ids, item.ids, answer_ids, item.vision)


def prefix_groups(rows: Sequence[TrainRow]) -> list[list[int]]:
    """Indices of ``rows`` by shared prompt prefix, in first-seen order; a row whose prefix is not known, alone."""
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r.prefix) if r.prefix else ("row", i), []).append(i)
    return list(groups.values())


def answer_labels(rows: Sequence[TrainRow], width: int):
    """[B, width] label ids for the last ``width`` positions: answer tokens, -100 (ignored) elsewhere."""
    import torch  # noqa: PLC0415

    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, width - r.answer_len:] = torch.tensor(list(r.answer))
    return labels


def batch_inputs(model, rows: Sequence[TrainRow], pad_id: int, device, dtype) -> dict:
    whole = [r.ids for r in rows]
    ids, mask = pad_batch(whole, pad_id, left=True)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": position_ids(model, whole, [r.vision for r in rows], mask).to(device),
            **vision_batch([r.vision for r in rows], device, dtype),
            **{k: v.to(device) for k, v in token_type_inputs(model, ids).items()}}


def answer_logits(model, rows: Sequence[TrainRow], pad_id: int, device, dtype, *, checkpointed: bool | None = None):
    """(logits [B, width, vocab], labels [B, width]): the logits that predict each row's last ``width`` tokens
    (``width`` = the longest answer) and their labels, -100 where a shorter answer leaves a position out.

    Rows that share their prompt prefix (``prefix_groups``) run as in scoring: each distinct prefix once, the
    rows' suffixes on its keys and values (``shared_prefix_answer_logits``); otherwise one forward over the whole
    left-padded rows. ``checkpointed``: ``gradient_checkpointing(model)``, given by a caller that asked once for
    many batches (None: asked here)."""
    import transformers.modeling_utils as modeling_utils  # noqa: PLC0415

    width = max(r.answer_len for r in rows)
    groups = prefix_groups(rows)
    if (len(groups) < len(rows) and all(r.prefix_len for r in rows)
            and all(len(r.suffix) + r.answer_len > width for r in rows)
            and hasattr(modeling_utils, "slice_logits_to_keep")  # per-row logits positions
            and not (gradient_checkpointing(model) if checkpointed is None else checkpointed)):
        return shared_prefix_answer_logits(model, rows, groups, width, pad_id, device, dtype)
    out = model(**batch_inputs(model, rows, pad_id, device, dtype), use_cache=False, logits_to_keep=width + 1)
    logits = out.logits[:, :-1, :].float()  # position t predicts token t + 1: these predict the last `width`
    return logits, answer_labels(rows, width).to(device)


def gradient_checkpointing(model) -> bool:
    """Whether a layer recomputes its forward in the backward pass: transformers then drops the cache such a layer
    is given in training, so a suffix would no longer see its prefix."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def shared_prefix_answer_logits(model, rows: Sequence[TrainRow], groups: Sequence[Sequence[int]], width: int,
                                pad_id: int, device, dtype):
    """``answer_logits`` with each group's prefix encoded once: the distinct prefixes left-padded in one forward
    whose keys and values (gradients flow through them) every row of the group then attends to, and the suffixes
    right-padded after them, so each row's real tokens sit in consecutive cache slots (as a sliding window counts
    them) at their whole-prompt positions; the logits are read at each row's last ``width`` + 1 real tokens. The
    same loss and gradients as the whole rows (tested), for fewer tokens: a target's positive and negatives share
    a prefix several times as long as their suffixes."""
    import torch  # noqa: PLC0415
    from transformers import DynamicCache  # noqa: PLC0415

    from srec.recommender.scoring import cache_argument  # noqa: PLC0415

    cache_name = cache_argument(model)
    prefixes = [rows[g[0]].prefix for g in groups]
    group_of = torch.empty(len(rows), dtype=torch.long)
    for gi, g in enumerate(groups):
        group_of[g] = gi
    pids, pmask = pad_batch(prefixes, pad_id, left=True)
    prefix_cache = DynamicCache()  # no config: every layer keeps every position (as scoring's prefix cache)
    model(input_ids=pids.to(device), attention_mask=pmask.to(device),
          position_ids=position_ids(model, prefixes, [None] * len(prefixes), pmask).to(device), use_cache=True,
          logits_to_keep=1, **{cache_name: prefix_cache},
          **{k: v.to(device) for k, v in token_type_inputs(model, pids).items()})
    rows_group = group_of.to(device)
    # index_select, not ``keys[rows_group]``: its backward (index_add) sums a group's rows in a fixed order, where
    # advanced indexing's (index_put with accumulate) adds floats atomically across CPU threads, and the same
    # training gave other low bits from run to run.
    cache = DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, rows_group),
                                          layer.values.index_select(0, rows_group)) for layer in prefix_cache.layers])
    suffixes = [[*r.suffix, *r.answer] for r in rows]
    sids, smask = pad_batch(suffixes, pad_id, left=False)
    last = smask.sum(-1) - 1
    keep = last[:, None] - torch.arange(width, -1, -1)[None]  # each row's last width + 1 real positions, in order
    out = model(input_ids=sids.to(device), attention_mask=torch.cat([pmask[group_of], smask], dim=1).to(device),
                position_ids=position_ids(model, suffixes, [r.vision for r in rows], smask,
                                          offset=pmask.sum(-1)[group_of].tolist(), left=False).to(device),
                **{cache_name: cache}, use_cache=True, logits_to_keep=keep.to(device),
                **vision_batch([r.vision for r in rows], device, dtype),
                **{k: v.to(device) for k, v in token_type_inputs(model, sids, cached=pids.shape[1]).items()})
    logits = out.logits[:, :-1, :].float()
    return logits, answer_labels(rows, width).to(device)


def answer_cross_entropy(logits, labels):
    """Mean cross-entropy over the labelled (answer) positions of ``answer_logits``' output."""
    import torch  # noqa: PLC0415

    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)


def answer_loss(model, rows: Sequence[TrainRow], pad_id: int, device, dtype):
    """Mean cross-entropy over the answer tokens of a batch; nothing else contributes."""
    return answer_cross_entropy(*answer_logits(model, rows, pad_id, device, dtype))


def choice_stats(logits, labels, rows: Sequence[TrainRow], yes_id: int, no_id: int) -> tuple[float, float]:
    """At each row's first answer token (where "Yes" / "No" is chosen): the log loss of the score the model is
    ranked by, P(yes) / (P(yes) + P(no)), against the row's answer, and the probability mass on the two
    answer tokens. The answer loss mixes both: a model can learn the answer format (mass -> 1) while its
    yes/no choice stays at chance (log loss ln 2 = 0.693 on balanced rows); these tell the two apart."""
    import torch  # noqa: PLC0415

    width = labels.shape[1]
    at = torch.tensor([width - r.answer_len for r in rows], device=logits.device)
    first = logits[torch.arange(len(rows), device=logits.device), at]          # [B, vocab]
    is_yes = (labels[torch.arange(len(rows), device=labels.device), at] == yes_id).float()
    margin = first[:, yes_id] - first[:, no_id]
    log_loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, is_yes)
    mass = first.softmax(-1)[:, [yes_id, no_id]].sum(-1).mean()
    return float(log_loss), float(mass)


@dataclass
class TrainResult:
    epochs_run: int = 0
    best_epoch: int = 0                       # 0: no epoch beat the base model's validation AUC
    best_valid_auc: float = float("nan")
    base_valid_auc: float = float("nan")      # the untrained model (epoch 0)
    history: list[dict] = field(default_factory=list)  # per epoch: loss, valid AUC, seconds
    resumed_from_epoch: int = 0
    stopped_early: bool = False
    train_examples: int = 0
    train_tokens_per_epoch: int = 0
    seconds: float = 0.0
    trainable_parameters: int = 0
    target_modules: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def length_batches(rows: Sequence[TrainRow], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length rows (less padding), the batch order shuffled too. The rows of one
    prompt prefix (``prefix_groups``: a target's positive and negatives) stay together, so that a batch encodes
    the prefix once: groups are shuffled, sorted by length within windows of ``batch_size`` * 32 rows and packed
    whole into batches of at most ``batch_size`` rows (a larger group is shuffled and split). Rows that share
    nothing batch exactly as single rows always did."""
    groups = prefix_groups(rows)
    units = []
    for i in rng.permutation(len(groups)).tolist():
        group = groups[i] if len(groups[i]) <= batch_size else rng.permutation(groups[i]).tolist()
        units += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    window = batch_size * 32
    batches: list[list[int]] = []
    start = 0
    while start < len(units):
        end, n = start, 0
        while end < len(units) and n < window:
            n += len(units[end])
            end += 1
        batch: list[int] = []
        for unit in sorted(units[start:end], key=lambda u: max(rows[i].length for i in u)):
            if len(batch) + len(unit) > batch_size:
                batches.append(batch)
                batch = []
            batch += unit
        batches.append(batch)
        start = end
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(rows: Sequence[TrainRow], settings: RecommenderSettings, epoch: int) -> list[list[int]]:
    """The batches of one epoch (``length_batches`` seeded by ``settings.seed + epoch``)."""
    return length_batches(rows, settings.batch_size, np.random.default_rng(settings.seed + epoch))


def train_epoch(model, rows: Sequence[TrainRow], optimizer, params, settings: RecommenderSettings, epoch: int, *,
                pad_id: int, device, dtype, scheduler=None, choice_ids: tuple[int, int] | None = None,
                batches: Sequence[Sequence[int]] | None = None) -> dict:
    """One pass over ``rows`` in ``batches`` (default ``epoch_batches``) on the answer loss, with
    gradient accumulation and clipping; ``scheduler`` (if any) steps with the optimizer. Returns the epoch-mean
    ``train_loss`` and, given ``choice_ids`` (the "Yes" and "No" token ids), the row-weighted epoch means of
    ``choice_stats``: ``train_choice_log_loss`` and ``train_choice_mass``."""
    import torch  # noqa: PLC0415

    model.train()
    losses, choice = [], []
    optimizer.zero_grad(set_to_none=True)
    batches = epoch_batches(rows, settings, epoch) if batches is None else batches
    checkpointed = gradient_checkpointing(model)  # a scan of every module: once, not per batch
    for i, idx in enumerate(batches):
        batch = [rows[j] for j in idx]
        logits, labels = answer_logits(model, batch, pad_id, device, dtype, checkpointed=checkpointed)
        loss = answer_cross_entropy(logits, labels)
        accumulate = settings.grad_accumulation
        window = min(accumulate, len(batches) - i // accumulate * accumulate)  # the last window may be short
        (loss / window).backward()
        losses.append(float(loss.detach()))
        if choice_ids is not None:
            with torch.no_grad():
                choice.append((len(batch), *choice_stats(logits.detach(), labels, batch, *choice_ids)))
        if (i + 1) % settings.grad_accumulation == 0 or i + 1 == len(batches):
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    out = {"train_loss": float(np.mean(losses))}
    if choice:
        n, log_loss, mass = (np.array(c, dtype=float) for c in zip(*choice))
        out["train_choice_log_loss"] = float(np.average(log_loss, weights=n))
        out["train_choice_mass"] = float(np.average(mass, weights=n))
    return out


# One checkpoint folder, replaced whole after every epoch (written beside it, then renamed): the adapter of
# the last epoch, the best epoch's adapter and the trainer state always belong to the same epoch, whenever
# the process is killed.
CHECKPOINT = "checkpoint"
_RESULT_STATE = ("best_epoch", "best_valid_auc", "base_valid_auc", "history", "stopped_early")


def best_adapter_dir(work_dir: Path) -> Path:
    """Where ``train_lora`` leaves the best epoch's adapter (PEFT format)."""
    return Path(work_dir) / CHECKPOINT / "best"


def _state(run_key: str, epoch: int, optimizer, scheduler, result: TrainResult) -> dict:
    import torch  # noqa: PLC0415

    return {"run_key": run_key, "epoch": epoch, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            **{k: getattr(result, k) for k in _RESULT_STATE}}


def _commit_checkpoint(work_dir: Path, peft_model, state: dict, improved: bool) -> None:
    import torch  # noqa: PLC0415

    ckpt, tmp, old = work_dir / CHECKPOINT, work_dir / f"{CHECKPOINT}.tmp", work_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    peft_model.save_pretrained(tmp / "last")
    if improved:
        peft_model.save_pretrained(tmp / "best")
    else:
        # hard links, not copies: saved files are never rewritten in place (each commit writes a new folder)
        shutil.copytree(ckpt / "best", tmp / "best", copy_function=os.link)
    torch.save(state, tmp / "trainer_state.pt")
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)  # the commit: from here on a restart resumes after this epoch
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(work_dir: Path, run_key: str, log) -> dict | None:
    """The committed trainer state of this run, or None (then ``work_dir`` is cleared for a fresh start)."""
    import torch  # noqa: PLC0415

    ckpt, old = work_dir / CHECKPOINT, work_dir / f"{CHECKPOINT}.old"
    if not ckpt.exists() and old.exists():
        os.replace(old, ckpt)  # killed between the two renames of a commit: the previous epoch stands
    state = None
    if (ckpt / "trainer_state.pt").is_file():
        try:
            state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint means starting over, said so
            log(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); starting over")
        else:
            if state.get("run_key") != run_key:
                log("a checkpoint from another configuration was found; starting over")
                state = None
    if state is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    return state


def train_lora(model, rows: Sequence[TrainRow], validate: Callable[[object], float], settings: RecommenderSettings,
               *, pad_id: int, device, dtype, work_dir: Path, run_key: str, quantized: bool = False,
               choice_ids: tuple[int, int] | None = None,
               log: Callable[[str], None] = print) -> tuple[object, TrainResult]:
    """Wrap ``model`` with LoRA, train on ``rows``, early-stop on ``validate(model)`` (validation AUC).

    ``choice_ids`` (the "Yes" and "No" token ids): when given, every epoch also records ``choice_stats`` on
    its training batches (``train_choice_log_loss``, ``train_choice_mass`` in the history).

    Returns the PEFT model holding the *best* epoch's adapter (or the untrained one, when no epoch beat
    the base model) and what happened. ``best_adapter_dir(work_dir)`` holds that adapter in PEFT format. A run
    killed part-way resumes after its last finished epoch when called again with the same ``run_key``.
    """
    import torch  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import get_scheduler  # noqa: PLC0415

    if not rows:
        raise ValueError("no training rows")
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    targets = lora_target_modules(model)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                                  lora_dropout=settings.lora_dropout, target_modules=targets,
                                                  bias="none"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    result = TrainResult(train_examples=len(rows), train_tokens_per_epoch=sum(r.length for r in rows),
                         trainable_parameters=sum(p.numel() for p in params), target_modules=len(targets))
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    plans = {e: epoch_batches(rows, settings, e) for e in range(1, settings.epochs + 1)}  # also the scheduler's length
    total = sum(math.ceil(len(b) / settings.grad_accumulation) for b in plans.values())
    scheduler = get_scheduler(settings.lr_schedule if settings.lr_schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(settings.warmup_ratio * total), num_training_steps=total)

    work_dir = Path(work_dir)
    ckpt = work_dir / CHECKPOINT
    state = _load_checkpoint(work_dir, run_key, log)
    if state is not None:
        set_peft_model_state_dict(peft_model, load_file(ckpt / "last" / "adapter_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])  # LoRA dropout masks continue as in an uninterrupted run
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        for k in _RESULT_STATE:
            setattr(result, k, state[k])
        result.resumed_from_epoch = state["epoch"]
        start_epoch = state["epoch"] + 1
        if state["epoch"]:
            log(f"resuming from epoch {state['epoch']} (best valid AUC {state['best_valid_auc']:.4f})")
    else:
        peft_model.eval()
        result.base_valid_auc = validate(peft_model)  # LoRA B starts at zero: this is the base model
        result.best_valid_auc = result.base_valid_auc
        log(f"epoch 0 (no training): valid AUC {result.base_valid_auc:.4f}")
        _commit_checkpoint(work_dir, peft_model, _state(run_key, 0, optimizer, scheduler, result), improved=True)
        start_epoch = 1

    since_best = sum(1 for h in result.history if h["epoch"] > result.best_epoch)
    for epoch in range(start_epoch, settings.epochs + 1):
        if result.stopped_early:
            break
        t0 = time.perf_counter()
        fit = train_epoch(peft_model, rows, optimizer, params, settings, epoch, pad_id=pad_id, device=device,
                          dtype=dtype, scheduler=scheduler, choice_ids=choice_ids, batches=plans[epoch])
        peft_model.eval()
        auc = validate(peft_model)
        improved = auc > result.best_valid_auc
        entry = {"epoch": epoch, **fit, "valid_auc": auc, "lr": scheduler.get_last_lr()[0],
                 "seconds": round(time.perf_counter() - t0, 2)}
        choice_note = ("" if "train_choice_log_loss" not in fit else
                       f" (yes/no choice log loss {fit['train_choice_log_loss']:.4f}, P(yes)+P(no) "
                       f"{fit['train_choice_mass']:.3f})")
        result.history.append(entry)
        log(f"epoch {epoch}/{settings.epochs}: train loss {fit['train_loss']:.4f}{choice_note}, valid AUC {auc:.4f}"
            + (" (best)" if improved else ""))
        if improved:
            result.best_epoch, result.best_valid_auc, since_best = epoch, auc, 0
        else:
            since_best += 1
        if settings.patience and since_best >= settings.patience:
            result.stopped_early = True
        _commit_checkpoint(work_dir, peft_model, _state(run_key, epoch, optimizer, scheduler, result), improved)
    result.epochs_run = len(result.history)
    set_peft_model_state_dict(peft_model, load_file(best_adapter_dir(work_dir) / "adapter_model.safetensors"))
    peft_model.eval()
    result.seconds = time.perf_counter() - started
    (work_dir / "train_result.json").write_text(json.dumps(result.as_dict(), indent=1))
    return peft_model, result
