"""CLIP image-text cosine: MLLM-SRec's hallucination score for a generated caption.

A caption that describes something the image does not show scores low. Any CLIP checkpoint works
(``openai/clip-vit-base-patch32`` on a GPU box, ``data/models/tiny-clip`` offline); texts longer than
the text tower's positions are truncated, as CLIP itself does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from srec.models.runner import ModelLoadError, RunnerSettings, model_fingerprint, resolve_device, resolve_model_folder


@dataclass(frozen=True)
class ClipSettings:
    model: str
    device: str = "auto"
    batch_size: int = 64
    allow_download: bool = False


def _features(out):
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return out if hasattr(out, "norm") else out.pooler_output


class ClipScorer:
    def __init__(self, settings: ClipSettings):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        transformers.utils.logging.disable_progress_bar()
        self.settings = settings
        self.folder = resolve_model_folder(RunnerSettings(model=settings.model, allow_download=settings.allow_download))
        self.device = resolve_device(settings.device)
        try:
            self.model = transformers.AutoModel.from_pretrained(self.folder, local_files_only=True).to(self.device).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.image_processor = transformers.AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise ModelLoadError(f"cannot load CLIP model from {self.folder}: {e}") from e
        if not hasattr(self.model, "get_image_features"):
            raise ModelLoadError(f"{settings.model} is a {type(self.model).__name__}, not a CLIP-style dual encoder")
        self.max_text_tokens = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        self.fingerprint = model_fingerprint(self.folder)
        self.torch = torch

    def score(self, image_paths: Sequence[str], texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each (image, text) pair, in [-1, 1]."""
        from PIL import Image  # noqa: PLC0415

        torch = self.torch
        if len(image_paths) != len(texts):
            raise ValueError(f"{len(image_paths)} images but {len(texts)} texts")
        scores: list[float] = []
        for start in range(0, len(texts), self.settings.batch_size):
            paths = image_paths[start:start + self.settings.batch_size]
            batch_texts = [t if t else " " for t in texts[start:start + self.settings.batch_size]]
            images = [Image.open(p).convert("RGB") for p in paths]
            pixel = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            tok = self.tokenizer(batch_texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                                 return_tensors="pt").to(self.device)
            with torch.inference_mode():
                img = _features(self.model.get_image_features(pixel_values=pixel))
                txt = _features(self.model.get_text_features(**tok))
                cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            scores.extend(cos.clamp(-1, 1).tolist())
        return scores
