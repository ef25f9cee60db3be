"""Recommender prompts as token ids: the user part (prefix), the candidate part (suffix) and the answer.

Every prompt goes through the model's own chat template once, rendered as text with a sentinel between
the user part and the candidate part, then split there: the prefix (system turn, profile, preference,
recent items) is the same for all of a user's candidates and is tokenized and encoded once; the suffix
(candidate item, its image, the question, the assistant header) depends only on the item and the prompt
style, so it is tokenized once per item. Training and scoring use exactly these ids:
``prefix + suffix (+ answer)``.

Answer ids come from the tokenizer, not from a guess: the template renders a conversation that ends
with the assistant's "Yes." / "No.", the generation-prompt rendering is cut off it, and the rest is
tokenized *after* the suffix to check it tokenizes the same alone as in context (a tokenizer that merges
across the boundary, or a template that adds a leading space, shows up here, not as silently wrong
scores). Scoring reads the logits of the first answer token.

Truncation (``fit_prefix``) drops the oldest history lines first, then cuts the preference summary from
its start; the candidate item and the answer are never cut. A prompt that does not fit even then is an
error naming the user.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import srec.prompts as _prompts
from srec.paths import DATA_DIR

SENTINEL = "\u2063SREC_ITEM\u2063"  # invisible separator + a name no item text contains
YES, NO = "Yes.", "No."


class PromptError(ValueError):
    """A prompt cannot be built (too long for max_length, answer tokens ambiguous ...)."""


@dataclass(frozen=True)
class ItemView:
    """A candidate item as a prompt shows it."""
    text: str                  # the candidate's lines (under "Candidate item:")
    image_path: str | None     # sent as an image part; None: no image part
    cut: bool = False          # the text was cut to max_item_chars (counted in sft_examples' metadata)


@dataclass(frozen=True)
class UserView:
    profile: str
    preference: str | None     # the summary; None for preference 'none'
    history: tuple[str, ...]   # history lines (titles), oldest first


@dataclass
class EncodedItem:
    ids: list[int]
    # The processor's image inputs for this item (``VISION_INPUTS`` keys, leading dim 1), None without an image.
    # Items showing the same image share these tensors.
    vision: dict | None = None


# An encoder keeps every distinct candidate image's tensors while a split's prompts are built and scored (negatives
# are drawn uniformly, so nearly every item of the category comes up, and evicting would mean processing images
# again). Past this many bytes they go to memory-mapped files instead: the kernel keeps those pages while memory
# allows and drops them, unlike process memory, when it does not. LLaVA-NeXT's up to five 336 x 336 tiles are
# 3.4 MB an image in bf16, 41 GB for Beauty's 12,101 items.
# SREC_PIXELS_IN_MEMORY_GIB sets another budget (0: every image mapped).
PIXELS_IN_MEMORY_BYTES = 2 << 30
PIXEL_SPILL_DIR = DATA_DIR / "tmp" / "pixels"


def pixels_in_memory_bytes() -> int:
    raw = os.environ.get("SREC_PIXELS_IN_MEMORY_GIB")
    if raw is None:
        return PIXELS_IN_MEMORY_BYTES
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not gib >= 0:
        raise ValueError(f"SREC_PIXELS_IN_MEMORY_GIB={raw!r}: give the GiB of image tensors an encoder keeps in memory "
                         "(a number >= 0; unset: 2)")
    return int(gib * 2**30)


# glibc keeps the memory the processor's per-image temporaries freed (bench/pixel_memory_bench.py saw it grow by
# about one image's tensors per image spilled, and ``malloc_trim`` give it all back): returned every so often.
TRIM_EVERY_BYTES = 64 << 20


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def _return_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PixelStore:
    """Processed image tensors: in process memory up to ``in_memory_bytes`` in all, each further image's tensors
    in files under ``spill_dir``, memory-mapped and unlinked at once, so nothing is left on disk once the tensors
    are gone, even after a crash (their storage's ``filename`` names the file it was mapped from)."""

    def __init__(self, in_memory_bytes: int | None = None, spill_dir: Path = PIXEL_SPILL_DIR):
        self.in_memory_bytes = pixels_in_memory_bytes() if in_memory_bytes is None else int(in_memory_bytes)
        self.spill_dir = Path(spill_dir)
        self.resident_bytes = 0
        self.mapped_bytes = 0

    def keep(self, tensors: dict) -> dict:
        """``tensors``, or memory-mapped copies of them once the in-memory budget is spent."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.resident_bytes + size <= self.in_memory_bytes:
            self.resident_bytes += size
            return tensors
        self.mapped_bytes += size
        mapped = {k: self._mapped(t) for k, t in tensors.items()}
        if self.mapped_bytes // TRIM_EVERY_BYTES != (self.mapped_bytes - size) // TRIM_EVERY_BYTES:
            _return_freed_memory()
        return mapped

    def _mapped(self, tensor):
        import torch  # noqa: PLC0415

        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="pixels-", suffix=".bin", dir=self.spill_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))  # no copy
            return torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
        finally:
            os.unlink(path)  # the mapping keeps the data; the disk space goes with it

    def describe(self) -> str:
        return (f"{self.resident_bytes / 2**20:,.1f} MiB of image tensors in memory, "
                f"{self.mapped_bytes / 2**20:,.1f} MiB memory-mapped from {self.spill_dir}")


# Processor outputs for an image that the recommender batches and passes on: LLaVA-1.5 style models take
# ``pixel_values`` [1, C, H, W]; LLaVA-NeXT style ones [1, patches, C, H, W] plus ``image_sizes`` [1, 2];
# Qwen2-VL style ones flattened patches [n, D] plus ``image_grid_thw`` [1, 3]; Idefics3 / SmolVLM style ones
# [1, tiles, C, H, W] plus ``pixel_attention_mask`` [1, tiles, H, W] (zero-padded tiles are what the model skips).
LLAVA_INPUTS = ("pixel_values", "image_sizes")          # passed on for any model
VISION_INPUTS = (*LLAVA_INPUTS, "image_grid_thw", "pixel_attention_mask")  # kept per item and batched
TEXT_INPUTS = ("input_ids", "attention_mask")
# Model types whose image tokens take 3-D rotary positions (time, height, width) from the model's own
# ``get_rope_index``, which ``position_ids`` applies to suffixes scored on a cached prefix.
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Model types whose image tokens attend to each other both ways, marked by ``token_type_ids`` (``token_type_inputs``).
BIDIRECTIONAL_IMAGE_MODEL_TYPES = ("gemma3",)
# Inputs beyond ``LLAVA_INPUTS`` that srec passes on, by the model types it has checked them on against a full
# forward per candidate (tests/test_recommender.py). Another family might place, count or mask its image tokens
# differently, and that would be a silently wrong score, not an error. Token types are not kept: ``position_ids``
# and ``token_type_inputs`` rebuild them from the model's image token id (the ids are all the rows carry).
FAMILY_INPUTS = {**{t: ("image_grid_thw", "mm_token_type_ids") for t in MROPE_MODEL_TYPES},
                 **{t: ("token_type_ids",) for t in BIDIRECTIONAL_IMAGE_MODEL_TYPES},
                 "idefics3": ("pixel_attention_mask",), "smolvlm": ("pixel_attention_mask",)}
# What other families' processors add, and why batching alone would not make them right.
UNSUPPORTED_VISION_INPUTS = {
    "image_grid_thw": "3-D rotary positions of a model family srec has not checked",
    "video_grid_thw": "Qwen2-VL family video inputs",
    "pixel_attention_mask": "image tiles masked by a model family srec has not checked",
    "token_type_ids": "token types of a model family srec has not checked (PaliGemma: a bidirectional prompt prefix)",
    "mm_token_type_ids": "models that mark image tokens by type for bidirectional attention or their own positions",
    "aspect_ratio_ids": "Mllama (Llama 3.2 Vision): images enter through cross-attention layers",
    "aspect_ratio_mask": "Mllama (Llama 3.2 Vision)",
    "cross_attention_mask": "Mllama (Llama 3.2 Vision)",
}


def check_vision_inputs(keys, processor_name: str, model_type: str | None = None) -> None:
    """Raise a ``PromptError`` naming the model family when a processor's image outputs are not ones the
    recommender's scorer and trainer handle for this model type (they would fail deep in a forward pass, or
    score wrongly)."""
    handled = {*LLAVA_INPUTS, *TEXT_INPUTS, *FAMILY_INPUTS.get(model_type, ())}
    extra = sorted(set(keys) - handled)
    if not extra:
        return
    why = "; ".join(f"{k}: {UNSUPPORTED_VISION_INPUTS.get(k, 'not a known input')}" for k in extra)
    raise PromptError(
        f"{processor_name} returns {extra} with an image for a {model_type!r} model; srec's recommender passes "
        f"images to LLaVA-1.5 and LLaVA-NeXT style models and to {', '.join(FAMILY_INPUTS)} only ({why}). "
        "Use a 'text' modality variant with this model, or one of those for the image and fused variants")


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mrope_index(model):
    """The model's own 3-D rotary index function (``get_rope_index``) for ``MROPE_MODEL_TYPES``; None for a model
    whose positions are 1-D."""
    base = base_model(model)
    if getattr(base.config, "model_type", None) not in MROPE_MODEL_TYPES:
        return None
    return base.model.get_rope_index


def image_token_types(model, ids):
    """What the Qwen2-VL processor returns as ``mm_token_type_ids`` (Gemma 3's as ``token_type_ids``): 1 at the
    model's image tokens, 0 elsewhere."""
    return (ids == base_model(model).config.image_token_id).int()


def token_type_inputs(model, ids, cached: int = 0) -> dict:
    """What a ``BIDIRECTIONAL_IMAGE_MODEL_TYPES`` model needs for an image's tokens to attend to each other both
    ways: ``token_type_ids``, 1 at image tokens, over every key position the attention sees, so ``cached``
    prefix positions (text: 0) come first; the model reads the types by key position. Other models: nothing."""
    import torch  # noqa: PLC0415

    if getattr(base_model(model).config, "model_type", None) not in BIDIRECTIONAL_IMAGE_MODEL_TYPES:
        return {}
    types = image_token_types(model, ids).long()
    if cached:
        types = torch.cat([types.new_zeros((types.shape[0], cached)), types], dim=1)
    return {"token_type_ids": types}


def position_ids(model, rows: Sequence[Sequence[int]], vision: Sequence[dict | None], mask,
                 offset: int | Sequence[int] = 0, *, left: bool = True):
    """Rotary position ids of ``rows`` padded on the left (or the right: ``left=False``; ``mask`` from
    ``pad_batch``) whose first real token sits at ``offset``: 0 for whole prompts, the prefix's length for suffixes
    run on a cached prefix (one offset for all rows, or one a row).

    1-D models: [B, L], counting real tokens. ``MROPE_MODEL_TYPES``: [3, B, L] from the model's ``get_rope_index``;
    an image's tokens take (time, height, width) positions and the text after it resumes at the image's largest
    position + 1, so a suffix's positions are not its token count. The prefix is text (positions 0 .. offset-1 on
    all three axes), so a suffix's positions in the whole prompt are its own, computed alone, plus ``offset``."""
    import torch  # noqa: PLC0415

    offsets = [int(offset)] * len(rows) if isinstance(offset, int) else [int(o) for o in offset]
    flat = torch.tensor(offsets, device=mask.device)[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
    rope_index = mrope_index(model)
    if rope_index is None:
        return flat
    # On the CPU, where the ids already are: the index is a Python loop over token groups, and on a GPU each
    # row's small ops and syncs would cost more than the arithmetic.
    out = flat.cpu().unsqueeze(0).repeat(3, 1, 1)
    width = mask.shape[1]
    for i, (ids, v) in enumerate(zip(rows, vision)):
        if v is None:
            continue  # text only: the same position on all three axes
        row = torch.tensor([list(ids)])
        pos, _ = rope_index(row, mm_token_type_ids=image_token_types(model, row),
                            image_grid_thw=v["image_grid_thw"].cpu())
        real = slice(width - len(ids), width) if left else slice(0, len(ids))
        out[:, i, real] = pos[:, 0] + offsets[i]
    return out.to(mask.device)


@dataclass(frozen=True)
class FittedPrefix:
    ids: list[int]
    text: str
    history_kept: int
    history_dropped: int
    summary_cut: bool


class PromptEncoder:
    """Tokenizes recommender prompts for one loaded model (tokenizer or processor + chat template)."""

    def __init__(self, loaded, *, max_length: int, cot: bool = False, pixels: PixelStore | None = None):
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self.max_length = int(max_length)
        self.cot = cot
        self.system = _prompts.RECOMMEND_USER.system
        self._items: dict[tuple[str, str | None], EncodedItem] = {}
        self._images: dict[str, dict] = {}  # image path -> its processed tensors, shared by every suffix showing it
        # Kept in the model's dtype: vision_batch casts to it anyway, and a bf16 model's candidates' pixels then take
        # half the memory (every distinct candidate image of a split stays cached while its prompts are scored).
        self.vision_dtype = getattr(loaded, "dtype", None)
        self.pixels = pixels or PixelStore()
        # One int object per distinct token id (``shared_ints``): an encoder keeps every candidate's ids and a split's
        # prefixes, and a plain list of ids past 256 holds a 32-byte object per position (LLaVA-NeXT's image token,
        # 32000, fills about 2,900 positions of each candidate's ids).
        self._int_objects: dict[int, int] = {}
        self.answer_ids = {YES: self._answer_ids(YES), NO: self._answer_ids(NO)}
        self.yes_id, self.no_id = self.answer_ids[YES][0], self.answer_ids[NO][0]
        if self.yes_id == self.no_id:
            raise PromptError(f"'Yes.' and 'No.' start with the same token id {self.yes_id}; cannot score")
        self.answer_len = max(len(v) for v in self.answer_ids.values())
        self.model_type = getattr(getattr(getattr(loaded, "model", None), "config", None), "model_type", None)

    # --- rendering --------------------------------------------------------------------------------

    def _messages(self, user_text: str, item: ItemView | None, item_text: str, assistant: str | None) -> list[dict]:
        image = item is not None and item.image_path is not None
        if self.processor is None:
            if image:
                raise PromptError("this recommender is a text-only causal LM; use modality 'text'")
            content: object = user_text + SENTINEL + item_text
            system: object = self.system
        else:
            content = [{"type": "text", "text": user_text + SENTINEL}]
            if image:
                content.append({"type": "image"})
            content.append({"type": "text", "text": item_text})
            system = [{"type": "text", "text": self.system}]
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": content}]
        if assistant is not None:
            msgs.append({"role": "assistant", "content": assistant if self.processor is None
                         else [{"type": "text", "text": assistant}]})
        return msgs

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def user_text(self, user: UserView) -> str:
        """The shared part's text: the user, then the question (it does not depend on the candidate)."""
        return user_body(user) + _prompts.recommend_question(self.cot).render()

    def render(self, user: UserView, item: ItemView, reasoning: str | None = None) -> tuple[str, str]:
        """(prefix text, suffix text); the suffix ends where the answer's first token is predicted."""
        full = self._render(self._messages(self.user_text(user), item, item.text, None), True)
        if full.count(SENTINEL) != 1:
            raise PromptError("the chat template dropped or repeated the user text; cannot split the prompt")
        prefix, suffix = full.split(SENTINEL)
        if self.cot:
            suffix += _prompts.RECOMMEND_COT_ANSWER.render(reasoning=" ".join((reasoning or "").split()))
        return prefix, suffix

    # --- answer ids -------------------------------------------------------------------------------

    def _answer_ids(self, answer: str) -> list[int]:
        probe_user = UserView(profile="User profile: 1 purchase.", preference=None, history=("Probe item",))
        probe_item = ItemView(text="Title: probe", image_path=None)
        user_text, item_text = self.user_text(probe_user), probe_item.text
        reasoning = _prompts.RECOMMEND_COT_ANSWER.render(reasoning="probe") if self.cot else ""
        gen = self._render(self._messages(user_text, probe_item, item_text, None), True).replace(SENTINEL, "")
        done = self._render(self._messages(user_text, probe_item, item_text, reasoning + (" " if self.cot else "")
                                           + answer), False).replace(SENTINEL, "")
        context = gen + reasoning
        if not done.startswith(context):
            raise PromptError("the chat template renders the assistant turn differently from its generation prompt")
        answer_text = done[len(context):].rstrip()
        base = self.token_ids(context)
        full = self.token_ids(context + answer_text)
        if full[:len(base)] != base or len(full) == len(base):
            raise PromptError(f"the tokenizer merges the answer {answer_text!r} with the prompt before it; "
                              "the answer's token ids would depend on the prompt")
        # In-context ids, not self.token_ids(answer_text): a sentencepiece tokenizer adds a prefix space to a bare
        # "Yes." and would give another id than the model sees after the prompt.
        return full[len(base):]

    def token_ids(self, text: str) -> list[int]:
        return self.shared_ints(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def shared_ints(self, ids) -> list[int]:
        """``ids`` as a list whose equal ids are one int object: 8 bytes a position instead of 40."""
        same = self._int_objects.setdefault
        return [same(i, i) for i in ids]

    # --- encoding ---------------------------------------------------------------------------------

    def encode_item(self, suffix_text: str, image_path: str | None, *, keep: bool = True) -> EncodedItem:
        """The suffix's ids and image inputs; kept for the next call with the same suffix unless ``keep`` is False
        (a suffix no other prompt shows; its image's tensors are shared either way)."""
        key = (suffix_text, image_path)
        hit = self._items.get(key)
        if hit is not None:
            return hit
        if image_path is None:
            enc = EncodedItem(self.token_ids(suffix_text), None)
        else:
            from PIL import Image  # noqa: PLC0415

            with Image.open(image_path) as im:
                image = im.convert("RGB")
            out = self.processor(text=[suffix_text], images=[image], add_special_tokens=False, return_tensors="pt")
            check_vision_inputs(out.keys(), type(self.processor).__name__, self.model_type)
            # Chain-of-thought suffixes differ per (user, candidate): without sharing, each would hold its own
            # copy of the candidate's pixels (MBs per pair at real image sizes).
            vision = self._images.get(image_path)
            if vision is None:
                vision = self._images[image_path] = self.pixels.keep({
                    k: out[k].to(self.vision_dtype) if self.vision_dtype is not None and out[k].is_floating_point()
                    else out[k] for k in VISION_INPUTS if k in out})
            enc = EncodedItem(self.shared_ints(out["input_ids"][0].tolist()), vision)
        if keep:
            self._items[key] = enc
        return enc

    def check_image_support(self) -> None:
        """Fail before any generation or training when this model's processor gives image inputs the
        recommender cannot pass on (``check_vision_inputs``); a probe image, nothing read from disk."""
        if self.processor is None:
            raise PromptError("this recommender is a text-only causal LM; use modality 'text'")
        from PIL import Image  # noqa: PLC0415

        text = self._render(self._messages("", ItemView("probe", "probe.png"), "probe", None), True)
        out = self.processor(text=[text.replace(SENTINEL, "")], images=[Image.new("RGB", (64, 64))],
                             add_special_tokens=False, return_tensors="pt")
        check_vision_inputs(out.keys(), type(self.processor).__name__, self.model_type)

    def fit_prefix(self, user: UserView, suffix_budget: int, *, who: str) -> FittedPrefix:
        """The longest prefix that leaves ``suffix_budget`` tokens for the candidate part and the answer."""
        budget = self.max_length - suffix_budget
        probe_item = ItemView(text="", image_path=None)

        def prefix_ids(u: UserView) -> tuple[list[int], str]:
            text = self.render(u, probe_item, "")[0]
            return self.token_ids(text), text

        n = len(user.history)
        ids, text = prefix_ids(user)
        if len(ids) <= budget:
            return FittedPrefix(ids, text, n, 0, False)
        lo, hi = 0, n  # keep the most recent k lines: find the largest k that fits
        best: tuple[list[int], str] | None = None
        while lo < hi:
            k = (lo + hi + 1) // 2
            cand = prefix_ids(UserView(user.profile, user.preference, user.history[n - k:] if k else ()))
            if len(cand[0]) <= budget:
                lo, best = k, cand
            else:
                hi = k - 1
        if best is not None and lo > 0:
            return FittedPrefix(best[0], best[1], lo, n - lo, False)
        bare = UserView(user.profile, user.preference, ())
        ids, text = prefix_ids(bare)
        if len(ids) <= budget:
            return FittedPrefix(ids, text, 0, n, False)
        if user.preference:
            words = user.preference.split()
            lo, hi = 0, len(words) - 1  # drop the fewest leading words of the summary
            while lo < hi:
                mid = (lo + hi) // 2
                if len(prefix_ids(UserView(user.profile, "... " + " ".join(words[mid + 1:]), ()))[0]) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            cut = UserView(user.profile, "... " + " ".join(words[lo + 1:]), ())
            ids, text = prefix_ids(cut)
            if len(ids) <= budget:
                return FittedPrefix(ids, text, 0, n, True)
        raise PromptError(f"{who}: the prompt does not fit max_length={self.max_length} even without history and "
                          f"summary ({len(ids)} prefix + {suffix_budget} item and answer tokens); raise max_length")


def user_body(user: UserView) -> str:
    history = "\n".join(f"{i + 1}. {line}" for i, line in enumerate(user.history)) or "(none listed)"
    preference = f"Preference summary: {user.preference}\n" if user.preference else ""
    return _prompts.RECOMMEND_USER.render(profile=user.profile, preference=preference, history=history)


def vision_batch(vision: Sequence[dict | None], device, dtype) -> dict:
    """The image inputs of a batch's rows (rows without an image contribute nothing), concatenated in row order.
    LLaVA-NeXT images of different aspect ratios have different patch counts: they are zero-padded to the
    largest, as its processor pads a batch (``image_sizes`` tells the model which patches are real)."""
    import torch  # noqa: PLC0415

    parts = [v for v in vision if v is not None]
    if not parts:
        return {}
    if len({frozenset(v) for v in parts}) > 1:
        raise PromptError(f"a batch's images came with different processor inputs ({sorted({tuple(sorted(v)) for v in parts})}); "
                          "one processor gives every image the same ones")
    out = {}
    for key in parts[0]:
        tensors = [v[key] for v in parts]
        shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
        padded = []
        for t in tensors:
            if list(t.shape[1:]) != shape[1:]:
                grown = t.new_zeros([t.shape[0], *shape[1:]])
                grown[tuple(slice(0, n) for n in t.shape)] = t
                t = grown
            padded.append(t)
        cat = torch.cat(padded).to(device)
        out[key] = cat.to(dtype) if cat.is_floating_point() else cat
    return out


def pad_batch(rows: Sequence[list[int]], pad_id: int, *, left: bool):
    """[B, L] ids and attention mask, padded on the left or the right."""
    import torch  # noqa: PLC0415

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if left:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        else:
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
    return ids, mask
