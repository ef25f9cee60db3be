"""What the MLLM recommender is configured by: its variants (the papers' ablations) and hyper-parameters.

A variant is ``<adapter>:<modality>+<preference>[+cot]``:

- adapter: ``lora`` (bf16/fp32 base + LoRA), ``qlora`` (4-bit NF4 base through bitsandbytes + LoRA; CUDA
  only) or ``zero-shot`` (the base model, no fine-tuning);
- modality of the candidate item: ``fused`` (its image + the fused MLLM caption), ``text`` (its title,
  brand, categories and description; no image, no caption) or ``image`` (its image only);
- preference: ``recurrent`` (MLLM-MSR block summaries), ``direct`` (one summary over the whole history)
  or ``none`` (only the chronological list of recent items, which every variant also has);
- ``+cot``: MLLM-SRec's chain of thought: the base model first writes a reasoning step about how the
  preference matches the item, then the answer follows it.

``zero-shot`` alone means the base model on the main prompt (``fused+recurrent``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ADAPTERS = ("lora", "qlora", "zero-shot")
MODALITIES = ("fused", "text", "image")
PREFERENCES = ("recurrent", "direct", "none")
SCHEDULES = ("linear", "cosine", "constant")
MAIN_STYLE = "fused+recurrent"


@dataclass(frozen=True)
class Variant:
    adapter: str = "lora"
    modality: str = "fused"
    preference: str = "recurrent"
    cot: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (("adapter", self.adapter, ADAPTERS), ("modality", self.modality, MODALITIES),
                                     ("preference", self.preference, PREFERENCES)):
            if value not in allowed:
                raise ValueError(f"variant {name} {value!r} is not one of {ALLOWED_HINT}")

    @property
    def style(self) -> str:
        """The prompt style: what the prompt contains (shared by a LoRA and a QLoRA variant)."""
        return f"{self.modality}+{self.preference}" + ("+cot" if self.cot else "")

    @property
    def name(self) -> str:
        return f"{self.adapter}:{self.style}"

    @property
    def trains(self) -> bool:
        return self.adapter != "zero-shot"

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """'lora:fused+recurrent', 'qlora:text+none+cot', 'zero-shot' (= 'zero-shot:fused+recurrent')."""
        s = str(spec).strip()
        adapter, _, style = s.partition(":")
        if not style:
            if adapter in ADAPTERS:
                style = MAIN_STYLE
            else:
                adapter, style = "lora", adapter
        parts = style.split("+")
        cot = parts[-1] == "cot"
        if cot:
            parts = parts[:-1]
        if len(parts) != 2:
            raise ValueError(f"variant {spec!r}: expected <adapter>:<modality>+<preference>[+cot]; {ALLOWED_HINT}")
        try:
            return cls(adapter=adapter, modality=parts[0], preference=parts[1], cot=cot)
        except ValueError as e:
            raise ValueError(f"variant {spec!r}: {e}") from None


ALLOWED_HINT = (f"adapters {ADAPTERS}, modalities {MODALITIES}, preferences {PREFERENCES}, optional '+cot' "
                "(e.g. 'lora:fused+recurrent', 'zero-shot', 'qlora:text+none+cot')")


def no_summary_comparison(variants: list[str] | tuple[str, ...]) -> tuple[bool, str]:
    """(holds, what the report says): a report whose LLM rows read a preference summary must also have a row
    without one (preference ``none``: the chronological item list only). A third-party rerun of MLLM-MSR found
    a plain list + SFT beating the recurrent summaries (DESIGN.md, "Reference numbers")."""
    parsed = [Variant.parse(v) for v in variants]
    with_summary = [v.name for v in parsed if v.preference != "none"]
    without = [v.name for v in parsed if v.preference == "none"]
    if not with_summary:
        return True, "no LLM row reads a preference summary"
    if without:
        return True, (f"summaries ({', '.join(with_summary)}) against the chronological item list alone "
                      f"({', '.join(without)})")
    return False, (f"NO no-summary row: {', '.join(with_summary)} read a preference summary, and no variant with "
                   "preference 'none' (e.g. 'lora:fused+none') shows what the item list alone does; a plain list + "
                   "SFT has beaten recurrent summaries in a third-party rerun of MLLM-MSR")


PROMPT_SETTINGS = ("history_items", "max_length", "max_item_chars", "max_title_chars", "cot_max_new_tokens")
EXAMPLE_SETTINGS = ("negatives_per_positive", *PROMPT_SETTINGS)


def settings_differences(recorded: dict, current: dict) -> list[str]:
    """'name: recorded -> current' for every key of ``current`` whose value differs from ``recorded``'s."""
    return [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in current.items() if recorded.get(k) != v]


@dataclass(frozen=True)
class RecommenderSettings:
    # the main variant, the no-summary comparison every report needs (no_summary_comparison), the base
    variants: tuple[str, ...] = ("lora:fused+recurrent", "lora:fused+none", "zero-shot")
    # --- examples and prompts
    negatives_per_positive: int = 1     # sampled (or explicit low-rated) negatives per training positive
    history_items: int = 20             # most recent items listed in the prompt (the oldest go first when too long)
    max_length: int = 1024              # tokens of prompt + answer; truncation never cuts the item or the answer
    max_item_chars: int = 240           # a candidate's text (title + caption / description) is cut to this
    max_title_chars: int = 90           # a history line (its title) is cut to this
    # --- LoRA (MLLM-MSR / MLLM-SRec settings)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    # --- optimisation
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"         # linear | cosine | constant, after warmup
    warmup_ratio: float = 0.05
    epochs: int = 4
    batch_size: int = 8
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0
    patience: int = 2                   # epochs without a better validation AUC before stopping
    valid_users: int = 0                # users whose valid 1+20 candidates early stopping scores (0: all)
    seed: int = 2024
    # --- scoring
    protocols: tuple[str, ...] = ("1+20",)  # stored candidate sets recommender_scores scores
    score_batch_size: int = 32          # candidate suffixes per forward pass (after the shared prefix)
    cot_max_new_tokens: int = 24        # length of a generated reasoning step
    # --- promotion gate
    promotion_margin: float = 0.0       # a retrained adapter may be this much worse on validation AUC and still
                                        # replace the current one (re-scored on the same candidates)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "protocols", tuple(self.protocols))
        if not self.variants:
            raise ValueError("variants must name at least one variant")
        names = [Variant.parse(v).name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants repeat: {names}")
        for name in ("negatives_per_positive", "history_items", "max_length", "lora_r", "lora_alpha", "epochs",
                     "batch_size", "grad_accumulation", "score_batch_size", "max_item_chars", "max_title_chars",
                     "cot_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.promotion_margin < 1:
            raise ValueError(f"promotion_margin must be in [0, 1), got {self.promotion_margin}")
        if self.patience < 0 or self.valid_users < 0:
            raise ValueError("patience and valid_users must be >= 0")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1 or self.learning_rate <= 0:
            raise ValueError("lora_dropout and warmup_ratio must be in [0, 1), learning_rate > 0")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        from srec.tables import PROTOCOLS_SAMPLED  # noqa: PLC0415

        bad = [p for p in self.protocols if p not in PROTOCOLS_SAMPLED]
        if bad or not self.protocols:
            raise ValueError(f"protocols must be among {tuple(PROTOCOLS_SAMPLED)}, got {self.protocols}")

    @property
    def parsed_variants(self) -> list[Variant]:
        return [Variant.parse(v) for v in self.variants]

    @property
    def styles(self) -> list[str]:
        """Prompt styles the variants need, in first-use order."""
        return list(dict.fromkeys(v.style for v in self.parsed_variants))

    def prompt_json(self) -> dict:
        """The settings that shape a prompt (training, validation and test prompts must agree on these)."""
        return {k: getattr(self, k) for k in PROMPT_SETTINGS}

    def example_json(self) -> dict:
        """The settings that determine the ``sft_examples`` rows: the prompt settings and the negatives."""
        return {k: getattr(self, k) for k in EXAMPLE_SETTINGS}

    def training_json(self) -> dict:
        """The hyper-parameters that determine a trained adapter (for its manifest and checkpoint key)."""
        not_training = {"variants", "protocols", "score_batch_size", "promotion_margin"}
        return {k: v for k, v in asdict(self).items() if k not in not_training}

    @classmethod
    def from_mapping(cls, raw: dict | None, **overrides) -> RecommenderSettings:
        """Defaults < ``raw`` (a category's ``recommender:`` block) < ``overrides`` that are not None."""
        merged = dict(raw or {})
        merged.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown recommender settings {unknown}; known: {sorted(known)}")
        for k in ("variants", "protocols"):
            if k in merged:
                merged[k] = tuple(merged[k])
        return cls(**merged)
