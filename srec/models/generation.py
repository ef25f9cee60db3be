"""What a generation step is asked and what it returns: the interface between the plain logic
(captions, preference summaries) and whatever runs the model (``srec.models.runner`` or a test double)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str                      # the user turn's text
    image_path: str | None = None    # an RGB image file: sent as an image part before the text
    system: str | None = None        # optional system turn


@dataclass(frozen=True)
class GenerationResult:
    text: str                        # decoded new tokens, special tokens removed, stripped
    generated_tokens: int            # new tokens produced (before decoding)


# Takes a batch of requests, returns one result per request in the same order.
GenerateFn = Callable[[Sequence[GenerationRequest]], list[GenerationResult]]


@dataclass(frozen=True)
class ModelIdentity:
    """What, besides the prompt, determines a generated text: part of every cache key and lineage record."""
    model: str                       # Hub id or local path as configured
    fingerprint: str                 # hash of the model's config + weights files (srec.models.runner.model_fingerprint)
    generation: tuple[tuple[str, object], ...] = ()   # sorted generation settings (max_new_tokens, do_sample, ...)

    @property
    def generation_json(self) -> str:
        import json  # noqa: PLC0415
        return json.dumps(dict(self.generation), sort_keys=True)

    @property
    def key(self) -> str:
        import hashlib  # noqa: PLC0415
        return hashlib.sha256(f"{self.model}\x00{self.fingerprint}\x00{self.generation_json}".encode()).hexdigest()[:16]
