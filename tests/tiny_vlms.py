"""Tiny random image-text models of other families than the shipped LLaVA, for the tests: Qwen-VL (2, 2.5, 3) and
Idefics3 / SmolVLM and Gemma 3, each with its real model and processor classes, built in memory on the tiny LLaVA's
tokenizer."""
import inspect
from types import SimpleNamespace

import torch

QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IDEFICS_FAMILIES = ("idefics3", "smolvlm")
GEMMA3_SLIDING_WINDOW = 64  # tokens: shorter than the tests' prompts, so the window binds

# The Qwen2-VL chat template's shape (ChatML turns; an image part is <|vision_start|><|image_pad|><|vision_end|>).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_vl(captioner, family: str):
    """A tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL with its real processor class, on the tiny LLaVA's tokenizer
    plus Qwen's special tokens. The processor is built in memory: its video half needs torchvision, which has no CPU
    wheel beside the pinned torch, and ``save_pretrained`` / ``AutoProcessor`` insist on it; images never touch it."""
    import transformers
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(captioner).tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                          "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(f"<|{t}|>") for t in ("image_pad", "video_pad", "vision_start", "vision_end")}
    text = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    # Class-name prefix and vision tower per family; every tower patches by 8 and merges 2 x 2 patches a token.
    families = {
        "qwen2_vl": ("Qwen2VL", {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}),
        "qwen2_5_vl": ("Qwen2_5_VL", {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                                      "window_size": 32, "fullatt_block_indexes": [1]}),
        "qwen3_vl": ("Qwen3VL", {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                                 "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}),
    }
    prefix, vision = families[family]
    vision = {**vision, "depth": 2, "num_heads": 2, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "in_channels": 3}
    if family == "qwen3_vl":
        text["head_dim"] = 16  # its default is 128, not hidden / heads
    config_cls, processor_cls = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}Processor")
    model_cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                        video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                        vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    image_processor = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    images = image_processor(min_pixels=16 * 16, max_pixels=128 * 128, patch_size=8, merge_size=2,
                             temporal_patch_size=2)
    processor = _without_video(processor_cls, image_processor=images, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return _loaded(model, processor, tok)


def _without_video(processor_cls, **parts):
    """The processor with no video half: ``video_processor=None`` passes its class check only when the check is
    told so (the video processor classes need torchvision; images never use them)."""
    from transformers.processing_utils import ProcessorMixin

    if "video_processor" not in inspect.signature(processor_cls.__init__).parameters:
        return processor_cls(**parts)
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if arg is None else check(self, name, arg))
    try:
        return processor_cls(**parts, video_processor=None)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def tiny_idefics(captioner, family: str):
    """A tiny random Idefics3 or SmolVLM: a SigLIP-style tower on 32 x 32 tiles of 8 x 8 patches, pixel-shuffled
    2 x 2 into 4 image tokens a tile, and the tiny LLaVA's Llama text model, tokenizer and chat template. An image
    becomes a global tile plus, above 32 pixels, a grid of tiles, so items carry different tile counts."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    llava = AutoProcessor.from_pretrained(captioner)
    tok = llava.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>"]},
                           replace_extra_special_tokens=False)
    text = AutoConfig.from_pretrained(captioner).text_config.to_dict()
    text["vocab_size"] = len(tok)
    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    config = getattr(transformers, f"{prefix}Config")(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config=text, scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    image_processor = (getattr(transformers, f"{prefix}ImageProcessorPil", None)
                       or getattr(transformers, f"{prefix}ImageProcessor"))
    processor = _without_video(getattr(transformers, f"{prefix}Processor"),
                               image_processor=image_processor(size={"longest_edge": 64},
                                                               max_image_size={"longest_edge": 32}),
                               tokenizer=tok, image_seq_len=4, chat_template=llava.chat_template)
    if family == "smolvlm":
        # Its chat template reads the video half's frame settings even for images (unused: no video is passed).
        processor.video_processor = SimpleNamespace(num_frames=64, fps=1)
    return _loaded(model, processor, tok)


# Gemma 3's chat template's shape (turns between <start_of_turn> / <end_of_turn>, the assistant is 'model', an
# image part is <start_of_image>, which the processor expands into its soft tokens).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def tiny_gemma3(captioner):
    """A tiny random Gemma 3: SigLIP tower on 32 x 32 images of 8 x 8 patches, 16 soft tokens an image (which attend
    to each other both ways), and a Gemma 3 text model of two layers: a sliding-window one, which sees
    ``GEMMA3_SLIDING_WINDOW`` tokens (fewer than a prompt holds), and a global one."""
    import transformers
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(captioner).tokenizer
    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok.add_special_tokens(
        {"additional_special_tokens": [*image_tokens.values(), "<start_of_turn>", "<end_of_turn>"]},
        replace_extra_special_tokens=False)
    tok._set_model_specific_special_tokens(special_tokens=image_tokens)  # tok.boi_token_id ..., as Gemma's has
    text = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
            "sliding_window": GEMMA3_SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"],
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    config = transformers.Gemma3Config(
        text_config=text, vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        mm_tokens_per_image=16, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    image_processor = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
    processor = transformers.Gemma3Processor(image_processor=image_processor(size={"height": 32, "width": 32}),
                                             tokenizer=tok, chat_template=GEMMA_CHAT_TEMPLATE, image_seq_length=16)
    return _loaded(model, processor, tok)


def tiny_llava_mistral(captioner, sliding_window: int):
    """The tiny LLaVA's vision tower, projector settings and processor on a Mistral text model of two layers whose
    attention slides over ``sliding_window`` tokens: plain causal attention, windowed."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    base = AutoConfig.from_pretrained(captioner)
    processor = AutoProcessor.from_pretrained(captioner)
    tok = processor.tokenizer
    text = {"model_type": "mistral", "vocab_size": base.text_config.vocab_size, "hidden_size": 64,
            "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "max_position_embeddings": 4096, "sliding_window": sliding_window,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = transformers.LlavaConfig(vision_config=base.vision_config.to_dict(), text_config=text,
                                      image_token_index=base.image_token_index,
                                      vision_feature_select_strategy=base.vision_feature_select_strategy,
                                      vision_feature_layer=base.vision_feature_layer)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    return _loaded(model, processor, tok)


def tiny_vlm(captioner, family: str):
    """``tiny_qwen_vl``, ``tiny_idefics`` or ``tiny_gemma3`` by family."""
    if family == "gemma3":
        return tiny_gemma3(captioner)
    return (tiny_qwen_vl if family in QWEN_VL_FAMILIES else tiny_idefics)(captioner, family)


def _loaded(model, processor, tok):
    """What ``srec.models.runner.LoadedModel`` offers the recommender (model, processor, tokenizer, device, dtype),
    set up as the tiny builder sets up its own: output head scaled to real-model logits, left padding, eos / pad."""
    from srec.models.tiny import LM_HEAD_SCALE

    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)
    tok.padding_side = "left"
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return SimpleNamespace(model=model, processor=processor, tokenizer=tok, device="cpu", dtype=torch.float32)
