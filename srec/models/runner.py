"""Load a Hugging Face model once and run batched chat generation with it.

Two kinds of model: image-text-to-text (``AutoModelForImageTextToText`` + ``AutoProcessor``: LLaVA,
LLaVA-NeXT, Qwen2-VL, SmolVLM ...) and causal LMs (``AutoModelForCausalLM`` + ``AutoTokenizer``).
Prompts go through the model's own chat template. Nothing is downloaded unless ``allow_download``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from srec.models.generation import GenerationRequest, GenerationResult, ModelIdentity

TASKS = ("auto", "image-text-to-text", "causal-lm")
QUANTIZATIONS = ("none", "4bit", "8bit")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
_BIG_FILE = 256 * 2**20  # files above this are fingerprinted by size, mtime and their first/last MiB


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class RunnerSettings:
    model: str                              # Hub id or local folder
    task: str = "auto"                      # 'auto': image-text-to-text when the config has a vision tower
    device: str = "auto"                    # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1' ...
    dtype: str = "auto"                     # 'auto' (bf16 on CUDA, fp32 on CPU), 'bfloat16', 'float16', 'float32'
    attn_implementation: str = "sdpa"
    quantization: str = "none"              # '4bit' (NF4) / '8bit' through bitsandbytes: CUDA only
    max_batch_size: int = 16
    max_new_tokens: int = 64
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 2024
    allow_download: bool = False            # False: local folders and the Hugging Face cache only
    revision: str | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("task", self.task, TASKS), ("quantization", self.quantization, QUANTIZATIONS),
                                     ("attn_implementation", self.attn_implementation, ATTENTION)):
            if value not in allowed:
                raise ModelLoadError(f"{name}={value!r} is not one of {allowed}")
        if self.max_batch_size < 1 or self.max_new_tokens < 1:
            raise ModelLoadError("max_batch_size and max_new_tokens must be >= 1")

    def generation_settings(self) -> dict:
        g = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
             "do_sample": self.do_sample}
        if self.do_sample:
            g.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return g


def resolve_device(device: str) -> str:
    import torch  # noqa: PLC0415

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} but CUDA is not available on this machine (torch {torch.__version__})")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch  # noqa: PLC0415

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype={dtype!r} is not one of auto, bfloat16, float16, float32") from None


def _file_digest(path: Path) -> str:
    real = path.resolve()
    # Hugging Face cache: snapshot files are links to blobs named by their content hash.
    if path.is_symlink() and real.parent.name == "blobs":
        return real.name
    size = real.stat().st_size
    h = hashlib.sha256()
    with real.open("rb") as f:
        if size <= _BIG_FILE:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
        else:
            h.update(f"{size}:{real.stat().st_mtime_ns}".encode())
            h.update(f.read(2**20))
            f.seek(-(2**20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()


def model_fingerprint(folder: Path) -> str:
    """Hash of every file in a model folder (config, tokenizer, processor, weights): names what ran."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in files:
        h.update(f"{p.relative_to(folder)}\x00{_file_digest(p)}\n".encode())
    return h.hexdigest()[:16]


def resolve_model_folder(settings: RunnerSettings) -> Path:
    """The local folder holding the model: the path itself, or its snapshot in the Hugging Face cache."""
    from srec.models.tiny import TINY_MODELS_DIR, ensure_tiny_models  # noqa: PLC0415

    path = Path(settings.model).expanduser()
    if not path.exists() and path.parent.resolve() == TINY_MODELS_DIR.resolve():
        ensure_tiny_models(out_dir=TINY_MODELS_DIR)  # the offline default: built on first use, deterministic
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if settings.model.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"model folder {path} does not exist")
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    try:
        return Path(snapshot_download(settings.model, revision=settings.revision,
                                      local_files_only=not settings.allow_download))
    except Exception as e:  # noqa: BLE001 (the hub raises several unrelated types for 'not cached')
        if settings.allow_download:
            raise ModelLoadError(f"could not download model {settings.model!r}: {e}") from e
        raise ModelLoadError(
            f"model {settings.model!r} is not a local folder and is not in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
            "srec does not download at run time by default. Download it first "
            f"(`hf download {settings.model}`), point `model` at a local folder, or set allow_download=true. "
            f"({type(e).__name__})"
        ) from e


def _detect_task(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    return "image-text-to-text" if "vision_config" in config else "causal-lm"


def _quantization_config(settings: RunnerSettings, device: str, dtype):
    if settings.quantization == "none":
        return None
    if not device.startswith("cuda"):
        raise ModelLoadError(
            f"quantization={settings.quantization!r} loads the model through bitsandbytes, which needs CUDA; "
            f"this run's device is {device!r}. Use quantization='none' on CPU."
        )
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    if settings.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def model_identity(settings: RunnerSettings, fingerprint: str, dtype) -> ModelIdentity:
    numerics = {"dtype": str(dtype).removeprefix("torch."), "quantization": settings.quantization}
    return ModelIdentity(model=settings.model, fingerprint=fingerprint,
                         generation=tuple(sorted({**settings.generation_settings(), **numerics}.items())))


@dataclass(frozen=True)
class ModelSpec:
    """What a ``LoadedModel`` of these settings would be (folder, device, dtype, fingerprint, identity), found
    without loading its weights: enough to decide that stored results of the same model can be kept."""
    settings: RunnerSettings
    folder: Path
    task: str
    device: str
    dtype: object
    fingerprint: str

    @classmethod
    def of(cls, settings: RunnerSettings) -> ModelSpec:
        folder = resolve_model_folder(settings)
        task = _detect_task(folder) if settings.task == "auto" else settings.task
        device = resolve_device(settings.device)
        return cls(settings, folder, task, device, resolve_dtype(settings.dtype, device), model_fingerprint(folder))

    @property
    def identity(self) -> ModelIdentity:
        return model_identity(self.settings, self.fingerprint, self.dtype)

    def describe(self) -> dict:
        """``LoadedModel.describe`` less what needs the weights (parameters, load time)."""
        return {**asdict(self.settings), "folder": str(self.folder), "task": self.task, "resolved_device": self.device,
                "resolved_dtype": str(self.dtype).removeprefix("torch."), "fingerprint": self.fingerprint}


def release_memory() -> None:
    """Return the memory of models nobody references any more before another loads: the garbage collector for
    reference cycles among modules and hooks, and on CUDA torch's cached blocks (another process may need them)."""
    import gc  # noqa: PLC0415

    gc.collect()
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LoadedModel:
    """A model, its processor or tokenizer, and batched chat generation."""

    def __init__(self, settings: RunnerSettings):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        transformers.utils.logging.disable_progress_bar()
        self.settings = settings
        self.folder = resolve_model_folder(settings)
        self.task = _detect_task(self.folder) if settings.task == "auto" else settings.task
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        quant = _quantization_config(settings, self.device, self.dtype)
        kwargs = {"dtype": self.dtype, "attn_implementation": settings.attn_implementation, "local_files_only": True}
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map={"": self.device})
        started = time.perf_counter()
        try:
            if self.task == "image-text-to-text":
                self.processor = transformers.AutoProcessor.from_pretrained(self.folder, local_files_only=True)
                self.tokenizer = self.processor.tokenizer
                self.model = transformers.AutoModelForImageTextToText.from_pretrained(self.folder, **kwargs)
            else:
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
                self.processor = None
                self.model = transformers.AutoModelForCausalLM.from_pretrained(self.folder, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            raise ModelLoadError(f"cannot load {self.task} model from {self.folder}: {e}") from e
        if quant is None:
            self.model.to(self.device)
        self.model.eval()
        if getattr(self.tokenizer, "chat_template", None) is None and getattr(self.processor, "chat_template", None) is None:
            raise ModelLoadError(f"{self.folder} has no chat template; srec sends chat prompts")
        self.tokenizer.padding_side = "left"  # decoder-only batched generation
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.load_seconds = time.perf_counter() - started
        self.fingerprint = model_fingerprint(self.folder)
        self.torch = torch

    @property
    def identity(self) -> ModelIdentity:
        return model_identity(self.settings, self.fingerprint, self.dtype)

    def describe(self) -> dict:
        return {**asdict(self.settings), "folder": str(self.folder), "task": self.task, "resolved_device": self.device,
                "resolved_dtype": str(self.dtype).removeprefix("torch."), "fingerprint": self.fingerprint,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "load_seconds": round(self.load_seconds, 2)}

    # --- prompts ---------------------------------------------------------------------------------

    def _conversation(self, req: GenerationRequest, image) -> list[dict]:
        conv = []
        if req.system:
            conv.append({"role": "system", "content": req.system if self.processor is None
                         else [{"type": "text", "text": req.system}]})
        if self.processor is None:
            if req.image_path is not None:
                raise ValueError(f"{self.settings.model} is a text-only causal LM; it cannot take an image")
            conv.append({"role": "user", "content": req.prompt})
        else:
            parts = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": req.prompt}]
            conv.append({"role": "user", "content": parts})
        return conv

    def _encode(self, batch: Sequence[GenerationRequest]):
        from PIL import Image  # noqa: PLC0415

        images = [Image.open(r.image_path).convert("RGB") if r.image_path else None for r in batch]
        convs = [self._conversation(r, im) for r, im in zip(batch, images)]
        if self.processor is not None:
            return self.processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, return_tensors="pt",
                                                      processor_kwargs={"padding": True})
        return self.tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt", padding=True)

    # --- generation ------------------------------------------------------------------------------

    def _generate_batch(self, batch: Sequence[GenerationRequest], max_new_tokens: int | None = None
                        ) -> list[GenerationResult]:
        torch = self.torch
        max_new = max_new_tokens or self.settings.max_new_tokens
        inputs = self._encode(batch).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        prompt_len = inputs["input_ids"].shape[1]
        if limit and prompt_len + max_new > limit:
            raise ValueError(f"prompt of {prompt_len} tokens + {max_new} new tokens exceeds "
                             f"the model's {limit} positions")
        if self.settings.do_sample:
            torch.manual_seed(self.settings.seed)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_new, min_new_tokens=min(self.settings.min_new_tokens, max_new),
                do_sample=self.settings.do_sample, pad_token_id=pad,
                **({"temperature": self.settings.temperature, "top_p": self.settings.top_p}
                   if self.settings.do_sample else {"temperature": None, "top_p": None, "top_k": None}),
            )
        new = out[:, prompt_len:]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        results = []
        for row, text in zip(new.tolist(), texts):
            n = 0  # new tokens up to and including the first end-of-sequence; later ones are padding
            for t in row:
                if t in eos_ids:
                    n += 1
                    break
                if t == pad:
                    break
                n += 1
            results.append(GenerationResult(text=text.strip(), generated_tokens=n))
        return results

    def generate(self, requests: Sequence[GenerationRequest], *, max_new_tokens: int | None = None
                 ) -> list[GenerationResult]:
        """Results in the order of ``requests``; batches of ``max_batch_size``, image and text-only prompts
        in separate batches, sorted by prompt length so batches pad little. ``max_new_tokens`` overrides the
        settings' for this call (the recommender's reasoning step has its own length)."""
        order = sorted(range(len(requests)),
                       key=lambda i: (requests[i].image_path is None, len(requests[i].prompt)))
        results: list[GenerationResult | None] = [None] * len(requests)
        size = self.settings.max_batch_size
        start = 0
        while start < len(order):
            has_image = requests[order[start]].image_path is not None
            end = start
            while end < len(order) and end - start < size and (requests[order[end]].image_path is not None) == has_image:
                end += 1
            idx = order[start:end]
            for i, r in zip(idx, self._generate_batch([requests[i] for i in idx], max_new_tokens)):
                results[i] = r
            start = end
        return results  # type: ignore[return-value]
