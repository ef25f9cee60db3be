"""Model resources: one ``ModelRunner`` per role (captioner, summariser, recommender) and the CLIP scorer.

Each loads its model once per step that uses it (``setup_for_execution``) and keeps it in a private
attribute; the fields are the run configuration a user edits in the launchpad (model id or local path,
device, dtype, quantization, batch size, generation settings).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import dagster as dg
from pydantic import PrivateAttr

from srec.models.clip import ClipScorer, ClipSettings
from srec.models.generation import GenerationRequest, GenerationResult, ModelIdentity
from srec.models.runner import LoadedModel, ModelSpec, RunnerSettings, release_memory
from srec.models.tiny import TINY_CAPTIONER, TINY_CLIP, TINY_SUMMARISER, default_model_path

ROLES = ("captioner", "summariser", "recommender")
DEFAULT_MODELS = {
    "captioner": str(default_model_path(TINY_CAPTIONER)),
    "summariser": str(default_model_path(TINY_SUMMARISER)),
    "recommender": str(default_model_path(TINY_CAPTIONER)),
}


class ModelRunner(dg.ConfigurableResource):
    """A Hugging Face model loaded once per step: batched chat generation (and, for the recommender, scoring)."""

    role: str = "captioner"
    model: str = DEFAULT_MODELS["captioner"]
    task: str = "auto"                 # 'image-text-to-text' | 'causal-lm' | 'auto' (from the model config)
    device: str = "auto"               # cuda when available, else cpu
    dtype: str = "auto"                # bf16 on CUDA, fp32 on CPU
    attn_implementation: str = "sdpa"  # 'sdpa' | 'eager' | 'flash_attention_2'
    quantization: str = "none"         # '4bit' (NF4) | '8bit': bitsandbytes, CUDA only
    max_batch_size: int = 16
    max_new_tokens: int = 48
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 2024
    allow_download: bool = False       # False: local folders and the Hugging Face cache only
    revision: str | None = None

    _loaded: LoadedModel | None = PrivateAttr(default=None)
    _base: tuple[RunnerSettings, LoadedModel] | None = PrivateAttr(default=None)

    def runner_settings(self) -> RunnerSettings:
        fields = {k: getattr(self, k) for k in RunnerSettings.__dataclass_fields__}
        return RunnerSettings(**fields)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.role not in ROLES:
            raise dg.DagsterInvalidConfigError(f"role must be one of {ROLES}", [], self.role)
        if self.role == "recommender":
            return  # loaded per variant (LoRA / 4-bit QLoRA bases differ): see load_fresh
        self._loaded = LoadedModel(self.runner_settings())
        if context.log:
            context.log.info(f"{self.role}: loaded {self.model} ({self._loaded.describe()['parameters']:,} parameters "
                             f"on {self._loaded.device}, {self._loaded.dtype})")

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:  # used outside a Dagster step (a script, a test), or the recommender's
            settings = self.runner_settings()
            shared = self._base[1] if self._base is not None and self._base[0] == settings else None
            self._loaded = shared or LoadedModel(settings)
        return self._loaded

    def load_fresh(self, **overrides) -> LoadedModel:
        """A new copy of the model (e.g. ``quantization='4bit'`` for QLoRA), not the shared one: training wraps
        the model it is given with adapters."""
        return LoadedModel(replace(self.runner_settings(), **overrides))

    def shared_base(self, **overrides) -> LoadedModel:
        """One loaded copy per step for read-only use (scoring, the promotion gate), across variants: loaded
        again only when a variant asks for other settings (a QLoRA variant's 4-bit base), after releasing the copy
        held before. With the resource's own settings it is ``loaded`` (one copy either way round). Callers attach
        an adapter only for as long as they score with it (``srec.recommender.pipeline.attached_adapter``);
        training, which changes the model it wraps, takes ``load_fresh``."""
        settings = replace(self.runner_settings(), **overrides)
        if self._base is not None and self._base[0] == settings:
            return self._base[1]
        self.release_shared_base()
        if self._loaded is not None and self._loaded.settings == settings:  # e.g. an earlier step's, in-process
            self._base = (settings, self._loaded)
            return self._loaded
        loaded = LoadedModel(settings)
        self._base = (settings, loaded)
        return loaded

    def release_shared_base(self) -> None:
        if self._base is not None:
            self._base = None
            release_memory()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.release_shared_base()

    def spec(self, **overrides) -> ModelSpec:
        """What ``load_fresh(**overrides)`` would load (folder, device, dtype, fingerprint), without loading it."""
        return ModelSpec.of(replace(self.runner_settings(), **overrides))

    @property
    def identity(self) -> ModelIdentity:
        return self.loaded.identity

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self.loaded.generate(requests)

    def describe(self) -> dict:
        return self.loaded.describe()


class HallucinationScorer(dg.ConfigurableResource):
    """CLIP image-text cosine for captions (MLLM-SRec's hallucination score)."""

    model: str = str(default_model_path(TINY_CLIP))
    device: str = "auto"
    batch_size: int = 64
    allow_download: bool = False

    _scorer: ClipScorer | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._scorer = ClipScorer(ClipSettings(self.model, self.device, self.batch_size, self.allow_download))

    @property
    def scorer(self) -> ClipScorer:
        if self._scorer is None:
            self._scorer = ClipScorer(ClipSettings(self.model, self.device, self.batch_size, self.allow_download))
        return self._scorer

    def score(self, image_paths: list[str], texts: list[str]) -> list[float]:
        return self.scorer.score(image_paths, texts)
