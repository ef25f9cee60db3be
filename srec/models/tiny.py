"""Tiny offline models in the real architectures: what the demo, the tests and CI run instead of a Hub model.

``build_tiny_models`` writes three Hugging Face model folders (``save_pretrained`` format, loadable by
the same ``Auto*`` classes as a Hub checkout) under ``data/models/``:

- ``tiny-llava``: ``LlavaForConditionalGeneration`` (CLIP vision tower + projector + Llama) with a
  ``LlavaProcessor`` and a chat template: the captioner and, later, the recommender.
- ``tiny-llama``: ``LlamaForCausalLM`` with a chat template: the preference summariser.
- ``tiny-clip``: ``CLIPModel`` with its tokenizer and image processor: the hallucination scorer.

Weights are random (seeded, so a build is reproducible bit for bit); the tokenizer is a byte-level BPE
fit on the category's item text plus srec's prompt templates, so prompts tokenize to realistic lengths.
Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from srec.paths import DATA_DIR
from srec.prompts import ALL_PROMPTS

TINY_MODELS_DIR = DATA_DIR / "models"
TINY_CAPTIONER = "tiny-llava"
TINY_SUMMARISER = "tiny-llama"
TINY_CLIP = "tiny-clip"
BUILDER_VERSION = "2"  # bump when the architecture settings below or the initialisation change

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE, *ROLE_TOKENS]  # ids 0..7: eos is 3, never 2 (CLIP's legacy pooling)

# A generic chat template in the role-token style (Zephyr / TinyLlama chat): content may be a string or
# a list of parts ({"type": "image"} / {"type": "text", "text": ...}) as processors expect.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSettings:
    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    clip_projection_dim: int = 32
    clip_text_max_positions: int = 77
    seed: int = 2024


class TinyModelError(RuntimeError):
    """The tiny models cannot be built (no text to fit the tokenizer on, unwritable folder ...)."""


def _corpus(texts: Iterable[str]) -> list[str]:
    prompts = [t.system or "" for t in ALL_PROMPTS.values()] + [t.template for t in ALL_PROMPTS.values()]
    # Answers the recommender is trained to give (issue 4) must be whole tokens in the vocabulary.
    extra = ["Yes.", "No.", " Yes.", " No.", "Yes", "No"] * 50
    return [t for t in (*prompts, *extra, *texts) if t]


def build_tokenizer(texts: Sequence[str], vocab_size: int, *, clip: bool = False):
    """A byte-level BPE fast tokenizer fit on ``texts`` (deterministic for the same input order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(_corpus(texts), trainer=trainer)
    if clip:
        # CLIP's text tower pools at the first EOS: every sequence is <s> ... </s>.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[IMAGE, *ROLE_TOKENS],
        padding_side="right" if clip else "left",  # decoder-only batched generation pads on the left
        model_max_length=77 if clip else 4096,
    )
    if not clip:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _image_processor(s: TinyModelSettings):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: PLC0415

    # The Pillow backend: the default CLIP processor needs torchvision, which has no CPU wheel here.
    return CLIPImageProcessorPil(
        size={"shortest_edge": s.image_size}, crop_size={"height": s.image_size, "width": s.image_size}
    )


def _vision_config(s: TinyModelSettings):
    from transformers import CLIPVisionConfig  # noqa: PLC0415

    return CLIPVisionConfig(
        hidden_size=s.vision_hidden_size, intermediate_size=s.vision_hidden_size * 2,
        num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
        image_size=s.image_size, patch_size=s.patch_size, projection_dim=s.clip_projection_dim,
    )


def _llama_config(s: TinyModelSettings, tok):
    from transformers import LlamaConfig  # noqa: PLC0415

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=s.max_position_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )


def _seed(seed: int) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The output head's rows are scaled up from the 0.02-std init. Behind the final RMSNorm (hidden state of norm
# ~sqrt(hidden_size)) default rows of norm ~0.16 keep every logit within about +-1.3: no fine-tuning could make
# "Yes." likely (the SFT loss sat at ~6.5 nats over the 2,048-token vocabulary, the floor). x10 gives logits of
# real-model magnitude. In exact arithmetic greedy outputs would not change; in float32 the random model's flat
# logits have near-ties that flip, so its (gibberish) captions and summaries differ from builder v1's.
LM_HEAD_SCALE = 10.0


def _scale_lm_head(model) -> None:
    import torch  # noqa: PLC0415

    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)


def _save_generation_config(model, tok) -> None:
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id


def build_llava(out: Path, tok, s: TinyModelSettings) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor  # noqa: PLC0415

    _seed(s.seed)
    config = LlavaConfig(
        vision_config=_vision_config(s), text_config=_llama_config(s, tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE), vision_feature_select_strategy="default",
        vision_feature_layer=-2, projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    _scale_lm_head(model)
    _save_generation_config(model, tok)
    processor = LlavaProcessor(
        image_processor=_image_processor(s), tokenizer=tok, patch_size=s.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_llama(out: Path, tok, s: TinyModelSettings) -> None:
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    _seed(s.seed + 1)
    model = LlamaForCausalLM(_llama_config(s, tok)).eval()
    _scale_lm_head(model)
    _save_generation_config(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_clip(out: Path, clip_tok, s: TinyModelSettings) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig  # noqa: PLC0415

    _seed(s.seed + 2)
    text = CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=s.vision_hidden_size, intermediate_size=s.vision_hidden_size * 2,
        num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
        max_position_embeddings=s.clip_text_max_positions, projection_dim=s.clip_projection_dim,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=_vision_config(s).to_dict(),
                        projection_dim=s.clip_projection_dim)
    model = CLIPModel(config).eval()
    model.save_pretrained(out)
    clip_tok.save_pretrained(out)
    _image_processor(s).save_pretrained(out)


def _manifest(texts_sha: str, s: TinyModelSettings) -> dict:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    return {"builder_version": BUILDER_VERSION, "settings": asdict(s), "corpus_sha256": texts_sha,
            "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


def build_tiny_models(texts: Sequence[str], out_dir: Path = TINY_MODELS_DIR,
                      settings: TinyModelSettings | None = None, *, force: bool = False) -> dict[str, Path]:
    """Build (or reuse, when the manifest matches) the three tiny models; returns role -> folder.

    ``texts`` is the corpus the tokenizer is fit on (item titles and descriptions of a category).
    """
    import transformers  # noqa: PLC0415

    transformers.utils.logging.disable_progress_bar()
    s = settings or TinyModelSettings()
    texts = [t for t in texts if t]
    if not texts:
        raise TinyModelError("no item text to fit the tiny models' tokenizer on")
    out_dir = Path(out_dir)
    texts_sha = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    manifest = _manifest(texts_sha, s)
    folders = {"captioner": out_dir / TINY_CAPTIONER, "summariser": out_dir / TINY_SUMMARISER,
               "clip": out_dir / TINY_CLIP}
    if not force and all((f / "srec_tiny_manifest.json").is_file() for f in folders.values()):
        if all(json.loads((f / "srec_tiny_manifest.json").read_text()) == manifest for f in folders.values()):
            return folders
    tok = build_tokenizer(texts, s.vocab_size)
    clip_tok = build_tokenizer(texts, s.vocab_size, clip=True)
    for role, build, t in (("captioner", build_llava, tok), ("summariser", build_llama, tok),
                           ("clip", build_clip, clip_tok)):
        folder = folders[role]
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            import shutil  # noqa: PLC0415
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        build(tmp, t, s)
        (tmp / "srec_tiny_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if folder.exists():
            import shutil  # noqa: PLC0415
            shutil.rmtree(folder)
        tmp.rename(folder)  # a half-built folder is never mistaken for a model
    return folders


def category_texts(categories: Sequence[str] | None = None) -> list[str]:
    """Item text (title, brand, categories, description) of categories, read by srec's own item readers.

    By default the categories of the project's shipped ``data/categories.yaml`` (not the extra files),
    so adding a benchmark category does not change the tiny models or invalidate caches.
    """
    import duckdb  # noqa: PLC0415

    from srec.config import load_categories, load_category_file  # noqa: PLC0415
    from srec.ingest import ingest_items  # noqa: PLC0415
    from srec.paths import CATEGORIES_FILE  # noqa: PLC0415

    configs = load_categories() if categories else load_category_file(CATEGORIES_FILE)
    names = list(categories) if categories else [n for n, c in configs.items() if c.items and c.items.exists()]
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise TinyModelError(f"unknown categories {unknown}; known: {sorted(configs)}")
    texts: list[str] = []
    with duckdb.connect() as con:
        for name in names:
            if configs[name].items is None:
                continue
            ingest_items(con, configs[name])
            rows = con.execute(
                "SELECT concat_ws(' ', title, brand, categories, description) FROM raw_items "
                "WHERE category = ? ORDER BY source_file, source_line", [name]
            ).fetchall()
            texts.extend(r[0] for r in rows if r[0])
    return texts


def default_model_path(name: str) -> Path:
    return TINY_MODELS_DIR / name


def ensure_tiny_models(categories: Sequence[str] | None = None, out_dir: Path = TINY_MODELS_DIR) -> dict[str, Path]:
    """The tiny models under ``out_dir``, built from the categories' text unless already there."""
    folders = {"captioner": out_dir / TINY_CAPTIONER, "summariser": out_dir / TINY_SUMMARISER,
               "clip": out_dir / TINY_CLIP}
    if all((f / "srec_tiny_manifest.json").is_file() for f in folders.values()):
        return folders
    return build_tiny_models(category_texts(categories), out_dir)
