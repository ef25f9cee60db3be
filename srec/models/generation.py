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
    """What, besides the prompt, determines a generated text: part of every cache key and lineage record.

    The key is the fingerprint and the settings, not ``model``: the fingerprint already names the files, and the
    same files under another path or name (a moved checkout, a Hub id vs its local copy) write the same text, so
    they share the cache instead of generating everything again."""
    model: str                       # Hub id or local path as configured: recorded, not part of the key
    fingerprint: str                 # hash of the model's config + weights files (srec.models.runner.model_fingerprint)
    # sorted settings that shape the text: generation (max_new_tokens, do_sample, ...) and the model's numerics
    # (dtype, quantization: a 4-bit or bf16 model writes other text than the fp32 one)
    generation: tuple[tuple[str, object], ...] = ()

    @property
    def generation_json(self) -> str:
        import json  # noqa: PLC0415
        return json.dumps(dict(self.generation), sort_keys=True)

    @property
    def key(self) -> str:
        import hashlib  # noqa: PLC0415
        return hashlib.sha256(f"{self.fingerprint}\x00{self.generation_json}".encode()).hexdigest()[:16]
