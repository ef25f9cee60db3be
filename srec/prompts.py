"""Every prompt srec sends to a model, each with a version.

The version is ``<name>/v<N>+<sha8 of the template text>``: editing a template changes the
version even if nobody bumps N, so a cache key or lineage record that carries it can never
describe a prompt other than the one that produced the text. Bump N for a deliberate change.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    revision: int
    template: str                       # str.format fields
    system: str | None = None
    version: str = field(init=False)

    def __post_init__(self) -> None:
        text = f"{self.system or ''}\x00{self.template}"
        sha = hashlib.sha256(text.encode()).hexdigest()[:8]
        object.__setattr__(self, "version", f"{self.name}/v{self.revision}+{sha}")

    def render(self, **fields: object) -> str:
        return self.template.format(**fields)


# --- item captions (MLLM-SRec fusion, MLLM-MSR item summariser) ---------------------------------

CAPTION_FUSED = PromptTemplate(
    name="caption_fused",
    revision=1,
    system="You describe products for a recommender system. Be factual; do not invent details.",
    template=(
        "Look at the product image and read its details.\n"
        "{item_text}\n"
        "Write one short paragraph that fuses what the image shows with the text: the kind of product, "
        "its main attributes (colour, material, size, style), its purpose and who it suits."
    ),
)

CAPTION_TEXT_ONLY = PromptTemplate(
    name="caption_text_only",
    revision=1,
    system=CAPTION_FUSED.system,
    template=(
        "No image is available for this product. Read its details.\n"
        "{item_text}\n"
        "Write one short paragraph describing the kind of product, its main attributes, its purpose "
        "and who it suits. Use only the details given."
    ),
)

# --- user preferences (MLLM-MSR recurrent summaries, MLLM-SRec temporal awareness) --------------

PREFERENCE_FIRST_BLOCK = PromptTemplate(
    name="preference_first_block",
    revision=1,
    system="You summarise a shopper's preferences from the products they bought, oldest first.",
    template=(
        "{profile}\n"
        "The shopper's first purchases:\n{block}\n"
        "Summarise the shopper's preferences in a few sentences: product types, attributes and styles they like."
    ),
)

PREFERENCE_NEXT_BLOCK = PromptTemplate(
    name="preference_next_block",
    revision=1,
    system=PREFERENCE_FIRST_BLOCK.system,
    template=(
        "{profile}\n"
        "Summary of the shopper's preferences so far:\n{previous_summary}\n"
        "Their next purchases:\n{block}\n"
        "Update the summary: keep what still holds, note how the preference is changing, "
        "and weight recent purchases more."
    ),
)

PREFERENCE_DIRECT = PromptTemplate(
    name="preference_direct",
    revision=1,
    system=PREFERENCE_FIRST_BLOCK.system,
    template=(
        "{profile}\n"
        "The shopper's purchases, oldest first:\n{block}\n"
        "Summarise the shopper's preferences and how they changed over time, weighting recent purchases more."
    ),
)

# --- the recommender (MLLM-SRec / MLLM-MSR yes/no SFT) ---------------------------------------------
# A prompt = the user part (profile, preference, recent items, then the question: everything that does not
# depend on the candidate, shared by all of a user's candidates and encoded once) + the item part (the
# candidate's image and its text as is, nothing else, so the per-candidate work is as short as it can be);
# the answer is "Yes." or "No.". Revision 2 of the question moved it from after the candidate into the user
# part (the item template of revision 1, which held it, is gone).

RECOMMEND_USER = PromptTemplate(
    name="recommend_user",
    revision=1,
    system=("You are a recommender system. From a shopper's profile, preference and recent purchases, decide "
            "whether they will buy the candidate item next. Answer Yes. or No."),
    template="{profile}\n{preference}Recent purchases, oldest first:\n{history}\n",
)

RECOMMEND_QUESTION = PromptTemplate(
    name="recommend_question",
    revision=2,
    template="Will the shopper buy the candidate item below next? Answer Yes. or No.\nCandidate item:\n",
)

# Chain of thought (MLLM-SRec): a reasoning step about how the preference matches the item, then the answer.
RECOMMEND_COT_QUESTION = PromptTemplate(
    name="recommend_cot_question",
    revision=2,
    template=("First reason in one sentence about how the shopper's preference matches the candidate item below, "
              "then answer: will the shopper buy it next? Yes. or No.\nCandidate item:\n"),
)


def recommend_question(cot: bool) -> PromptTemplate:
    """The question that closes the recommender prompt's user part."""
    return RECOMMEND_COT_QUESTION if cot else RECOMMEND_QUESTION


RECOMMEND_COT_REASONING = PromptTemplate(
    name="recommend_cot_reasoning",
    revision=1,
    template="Candidate item:\n{item}\nIn one sentence: how does this item match the shopper's preference?",
)

# The assistant turn in chain-of-thought prompts; the answer follows "Answer:".
RECOMMEND_COT_ANSWER = PromptTemplate(name="recommend_cot_answer", revision=1,
                                      template="Reasoning: {reasoning}\nAnswer:")

# --- not sent to a model, but part of prompts: versioned the same way ---------------------------

USER_PROFILE = PromptTemplate(
    name="user_profile",
    revision=1,
    template="User profile: {activity}{favourites}{ratings}",
)

ALL_PROMPTS: dict[str, PromptTemplate] = {
    p.name: p for p in (CAPTION_FUSED, CAPTION_TEXT_ONLY, PREFERENCE_FIRST_BLOCK, PREFERENCE_NEXT_BLOCK,
                        PREFERENCE_DIRECT, USER_PROFILE, RECOMMEND_USER, RECOMMEND_QUESTION, RECOMMEND_COT_QUESTION,
                        RECOMMEND_COT_REASONING, RECOMMEND_COT_ANSWER)
}


def prompt_versions(*templates: PromptTemplate) -> str:
    """One string naming several templates' versions (for a cache key or a lineage record)."""
    return ";".join(t.version for t in templates)


def item_text(title: str | None, brand: str | None = None, categories: str | None = None,
              description: str | None = None, max_description_chars: int = 600) -> str:
    """The item's text fields as prompt lines; absent fields are left out, never printed as 'None'."""
    lines = [f"Title: {title.strip() if title and title.strip() else '(no title)'}"]
    if brand and brand.strip():
        lines.append(f"Brand: {brand.strip()}")
    if categories and categories.strip():
        lines.append(f"Categories: {categories.strip()}")
    if description and description.strip():
        d = " ".join(description.split())
        lines.append(f"Description: {d[:max_description_chars]}{'...' if len(d) > max_description_chars else ''}")
    return "\n".join(lines)


def clean_text(v: object) -> str | None:
    """Whitespace collapsed; None for a non-string or a blank one."""
    if not isinstance(v, str):
        return None
    s = " ".join(v.split())
    return s or None


def cut_text(s: str, n: int) -> str:
    """``s`` cut to at most ``n`` characters, marked with '...' when cut."""
    return s if len(s) <= n else s[: n - 3].rstrip() + "..."
