"""The recommender's plain logic on the tiny LLaVA: prompts, answer ids, truncation, loss mask, scoring, adapters."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from srec.models.runner import LoadedModel, ModelLoadError, RunnerSettings
from srec.recommender.encoding import NO, YES, ItemView, PromptEncoder, PromptError, UserView
from srec.recommender.pipeline import attached_adapter
from srec.recommender.prefix_attention import (SharedPrefix, attention_with_lse, attention_with_lse_math,
                                              shared_prefix_attention_forward)
from srec.recommender.scoring import (mean_auc, prefix_attention_applies, prefix_attention_by_default, score_naive,
                                     score_shared_prefix)
from srec.recommender.settings import RecommenderSettings, Variant
from srec.recommender.training import answer_labels, answer_loss, batch_inputs, lora_target_modules, make_row
from tests.tiny_vlms import (GEMMA3_SLIDING_WINDOW, IDEFICS_FAMILIES, QWEN_VL_FAMILIES, tiny_gemma3, tiny_idefics,
                              tiny_llava_mistral, tiny_qwen_vl)

TITLES = ["Philips Sonicare Brush Heads", "OPI Nail Lacquer, Big Apple Red", "Neutrogena Hydro Boost Gel",
          "Maybelline Great Lash Mascara", "CeraVe Moisturizing Cream", "Revlon Colorstay Foundation"]


@pytest.fixture(scope="module")
def llava(tiny_models):
    return LoadedModel(RunnerSettings(model=str(tiny_models["captioner"])))


@pytest.fixture
def images(tmp_path) -> list[str]:
    paths = []
    for i in range(3):
        p = tmp_path / f"item{i}.png"
        Image.new("RGB", (40 + i, 30), (40 * i, 200 - 30 * i, 90)).save(p)
        paths.append(str(p))
    return paths


def _user(n_history: int = 4) -> UserView:
    return UserView(profile="User profile: 5 purchases.", preference="Likes nail polish and skin care.",
                    history=tuple(f"{TITLES[i % len(TITLES)]} #{i}" for i in range(n_history)))


def _items(images: list[str]) -> list[ItemView]:
    with_image = [ItemView(f"Title: {t}\nDescription: a product", images[i % len(images)]) for i, t in enumerate(TITLES)]
    text_only = [ItemView(f"Title: {t} (text only)", None) for t in TITLES[:3]]
    return with_image + text_only


def _encode(encoder: PromptEncoder, user: UserView, items: list[ItemView], budget: int | None = None):
    suffixes = [encoder.render(user, it)[1] for it in items]
    encoded = [encoder.encode_item(s, it.image_path) for s, it in zip(suffixes, items)]
    need = max(len(e.ids) for e in encoded) + encoder.answer_len if budget is None else budget
    return encoder.fit_prefix(user, need, who="test user"), encoded


def test_a_report_with_summaries_needs_a_no_summary_row():
    from srec.recommender.settings import RecommenderSettings, no_summary_comparison

    assert no_summary_comparison(RecommenderSettings().variants)[0]          # the defaults have it
    holds, text = no_summary_comparison(["lora:fused+recurrent", "zero-shot"])
    assert not holds and "NO no-summary row" in text and "lora:fused+recurrent, zero-shot:fused+recurrent" in text
    holds, text = no_summary_comparison(["lora:fused+direct", "qlora:text+none+cot"])
    assert holds and text == ("summaries (lora:fused+direct) against the chronological item list alone "
                              "(qlora:text+none+cot)")
    assert no_summary_comparison(["lora:image+none"]) == (True, "no LLM row reads a preference summary")
    assert no_summary_comparison([]) == (True, "no LLM row reads a preference summary")


def test_variants_parse_and_reject_unknown_values():
    assert Variant.parse("zero-shot") == Variant("zero-shot", "fused", "recurrent", False)
    assert Variant.parse("qlora:text+none+cot").name == "qlora:text+none+cot"
    assert Variant.parse("image+direct").adapter == "lora"
    for bad in ("lora:audio+recurrent", "lora:fused", "fine:fused+recurrent"):
        with pytest.raises(ValueError, match="variant"):
            Variant.parse(bad)
    with pytest.raises(ValueError, match="repeat"):
        RecommenderSettings(variants=("lora:fused+recurrent", "fused+recurrent"))
    with pytest.raises(ValueError, match="unknown recommender settings"):
        RecommenderSettings.from_mapping({"lora_rank": 8})


def test_item_views_say_when_the_candidate_text_was_cut():
    from srec.recommender.data import ItemInfo, item_view

    settings = RecommenderSettings(max_item_chars=120)
    short = ItemInfo(TITLES[1], None, None, "A red nail lacquer.", "Red nail polish in a glass bottle.", None)
    long = ItemInfo(TITLES[0], "Philips", "Beauty > Tools", "x " * 200, "A brush head. " * 20, None)
    for modality in ("fused", "text"):
        assert not item_view(short, modality, settings).cut
        view = item_view(long, modality, settings)
        assert view.cut and len(view.text) <= 120 and view.text.endswith("...")
    assert not item_view(long, "image", settings).cut


def test_answer_ids_are_what_the_tokenizer_produces_in_context(llava):
    for cot in (False, True):
        enc = PromptEncoder(llava, max_length=1024, cot=cot)
        prefix, suffix = enc.render(_user(), ItemView("Title: x", None), "it matches" if cot else None)
        for answer in (YES, NO):
            ids = enc.answer_ids[answer]
            full = llava.tokenizer(prefix + suffix + (" " if cot else "") + answer + llava.tokenizer.eos_token,
                                   add_special_tokens=False)["input_ids"]
            assert full[-len(ids):] == ids
        assert enc.yes_id != enc.no_id
        assert llava.tokenizer.decode([enc.yes_id]).strip().startswith("Yes")
        assert llava.tokenizer.decode([enc.no_id]).strip().startswith("No")


def test_prompt_splits_into_shared_prefix_and_item_suffix(llava, images):
    enc = PromptEncoder(llava, max_length=1024)
    user = _user()
    p1, s1 = enc.render(user, ItemView("Title: a", images[0]))
    p2, s2 = enc.render(user, ItemView("Title: b", None))
    assert p1 == p2 and "Likes nail polish" in p1 and "Title: a" not in p1
    assert "<image>" in s1 and "<image>" not in s2 and s1.endswith("<|assistant|>\n")
    whole = llava.processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": enc.system}]},
         {"role": "user", "content": [{"type": "text", "text": p1.split("<|user|>\n", 1)[1]}, {"type": "image"},
                                      {"type": "text", "text": s1.split("<image>\n", 1)[1].split("</s>")[0]}]}],
        tokenize=False, add_generation_prompt=True)
    assert whole == p1 + s1  # the split prompt is exactly the chat template's rendering


def test_truncation_drops_the_oldest_history_never_the_item_or_answer(llava, images):
    enc = PromptEncoder(llava, max_length=1024)
    user = _user(40)
    full, encoded = _encode(enc, user, _items(images))
    assert full.history_dropped == 0
    need = max(len(e.ids) for e in encoded) + enc.answer_len
    small = PromptEncoder(llava, max_length=len(full.ids) - 60 + need)
    fitted, _ = _encode(small, user, _items(images))
    assert 0 < fitted.history_kept < 40 and fitted.history_kept + fitted.history_dropped == 40
    assert f"#{39}" in fitted.text and "#0\n" not in fitted.text  # the most recent stay, the oldest go
    assert len(fitted.ids) + need <= small.max_length
    tight = PromptEncoder(llava, max_length=need + 5)
    with pytest.raises(PromptError, match="test user.*does not fit"):
        _encode(tight, user, _items(images))


def test_shared_prefix_scores_equal_a_full_forward_per_candidate(llava, images):
    enc = PromptEncoder(llava, max_length=1024)
    fitted, encoded = _encode(enc, _user(6), _items(images))
    kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": llava.device, "dtype": llava.dtype}
    shared = score_shared_prefix(llava.model, fitted.ids, encoded, pad_id=llava.tokenizer.pad_token_id,
                                 batch_size=4, **kw)  # several batches, rows of different lengths
    naive = score_naive(llava.model, fitted.ids, encoded, **kw)
    assert np.all((shared > 0) & (shared < 1))
    np.testing.assert_allclose(shared, naive, atol=1e-4, rtol=0)
    assert np.ptp(naive) > 1e-6  # candidates really differ, so agreement is not trivial
    _assert_prefix_attention_scores_like_the_cache(llava, fitted, encoded, kw)


def _assert_prefix_attention_scores_like_the_cache(loaded, fitted, encoded, kw, longest: int | None = None) -> None:
    """The model's suffixes ran through the shared-prefix attention (by default, and it raises unless every
    layer's attention did), and score as on a batch view of the prefix cache with the model's own mask."""
    assert prefix_attention_applies(loaded.model, longest) and prefix_attention_by_default(loaded.model, "cpu", longest)
    assert not prefix_attention_by_default(loaded.model, "meta", longest)  # other devices: the cache view unless asked
    pad = loaded.tokenizer.pad_token_id
    via_attention = score_shared_prefix(loaded.model, fitted.ids, encoded, pad_id=pad, batch_size=3,
                                        prefix_attention=True, **kw)
    via_cache = score_shared_prefix(loaded.model, fitted.ids, encoded, pad_id=pad, batch_size=3,
                                    prefix_attention=False, **kw)
    np.testing.assert_allclose(via_attention, via_cache, atol=1e-5, rtol=0)


def _attention_reference(query, prefix_k, prefix_v, key, value, scale):
    """Plain attention of right-padded suffix rows over [prefix; own suffix], causal within the suffix, kv heads
    repeated the way transformers' repeat_kv does."""
    b, heads, s, _ = query.shape
    group = heads // key.shape[1]
    keys = torch.cat([prefix_k.expand(b, -1, -1, -1), key], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([prefix_v.expand(b, -1, -1, -1), value], dim=2).repeat_interleave(group, dim=1)
    p = prefix_k.shape[2]
    allowed = torch.ones(s, p + s, dtype=torch.bool).tril(p)
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=allowed,
                                                            scale=scale).transpose(1, 2)


@pytest.mark.parametrize("group", [1, 2])
def test_shared_prefix_attention_equals_attention_over_prefix_and_suffix(group, monkeypatch):
    """The two parts merged by log-sum-exp equal one softmax over the whole key range, grouped-query heads
    included, on the CPU kernel and on the plain float32 path other devices take."""
    import srec.recommender.prefix_attention as prefix_attention

    g = torch.Generator().manual_seed(3)
    b, kv_heads, s, p, d = 3, 2, 7, 11, 16
    query = torch.randn(b, kv_heads * group, s, d, generator=g)
    key, value = torch.randn(b, kv_heads, s, d, generator=g), torch.randn(b, kv_heads, s, d, generator=g)
    prefix_k, prefix_v = torch.randn(1, kv_heads, p, d, generator=g), torch.randn(1, kv_heads, p, d, generator=g)
    layer = type("Layer", (), {"layer_idx": 1})()
    shared = SharedPrefix([(None, None), (prefix_k, prefix_v)])
    expected = _attention_reference(query, prefix_k, prefix_v, key, value, 0.3)
    got, _ = shared_prefix_attention_forward(layer, query, key, value, None, scaling=0.3, shared_prefix=shared)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    monkeypatch.setattr(prefix_attention, "attention_with_lse", attention_with_lse_math)
    got, _ = shared_prefix_attention_forward(layer, query, key, value, None, scaling=0.3, shared_prefix=shared)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    monkeypatch.setattr(prefix_attention, "MATH_SCORES_BYTES", 1056)  # query rows in chunks of 3 to 12
    got, _ = shared_prefix_attention_forward(layer, query, key, value, None, scaling=0.3, shared_prefix=shared)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert shared.calls == 3
    for causal in (False, True):  # the two ways also agree on the log-sum-exps the merge weighs by
        kernel, plain = attention_with_lse(query, query, query, causal=causal, scale=0.3), \
            attention_with_lse_math(query, query, query, causal=causal, scale=0.3)
        for a, c in zip(kernel, plain):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="without its shared_prefix argument"):
        shared_prefix_attention_forward(layer, query, key, value, None, scaling=0.3)
    got, _ = shared_prefix_attention_forward(layer, query, key, value, None, scaling=0.3, shared_prefix=shared,
                                             sliding_window=p + s + 1)  # a window every key is inside
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="does not implement a sliding window that binds"):
        shared_prefix_attention_forward(layer, query, key, value, None, shared_prefix=shared, sliding_window=p + s)
    with pytest.raises(RuntimeError, match=f"ran in {shared.calls} of the text model's {shared.calls + 1} layers"):
        shared.check_ran(shared.calls + 1)


def _items_showing_shapes(tmp_path, shapes) -> list[ItemView]:
    """Candidates showing images of the given sizes in turn (different grids or patch counts), then a text-only one."""
    paths = []
    for i, size in enumerate(shapes):
        paths.append(str(tmp_path / f"shape{i}.png"))
        Image.new("RGB", size, (60 * i, 120, 200 - 50 * i)).save(paths[-1])
    shown = [ItemView(f"Title: {t}", paths[i % len(paths)]) for i, t in enumerate(TITLES)]
    return [*shown, ItemView("Title: plain", None)]


def _assert_a_mixed_batch_trains_like_its_rows_alone(loaded, enc, fitted, encoded) -> None:
    """Training batches images like scoring: each row's answer loss in a mixed batch is its loss alone."""
    rows = [make_row(fitted.ids, e, enc.answer_ids[YES]) for e in encoded]
    pad = loaded.tokenizer.pad_token_id
    together = answer_loss(loaded.model, rows, pad, loaded.device, loaded.dtype)
    alone = [answer_loss(loaded.model, [r], pad, loaded.device, loaded.dtype) for r in rows]
    assert together.item() == pytest.approx(float(np.mean([a.item() for a in alone])), abs=1e-4)


def _tiny_llava_next(captioner, out):
    """A LLaVA-NeXT built from the tiny LLaVA's parts (same tokenizer, chat template, vision and text configs):
    anyres images of different aspect ratios get different numbers of patches, and ``image_sizes``."""
    import transformers
    from transformers import AutoConfig, AutoProcessor, LlavaNextConfig, LlavaNextForConditionalGeneration

    image_processor_cls = (getattr(transformers, "LlavaNextImageProcessorPil", None)
                           or transformers.LlavaNextImageProcessor)
    base = AutoConfig.from_pretrained(captioner)
    llava_processor = AutoProcessor.from_pretrained(captioner)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(),
                             image_token_index=base.image_token_index, image_grid_pinpoints=pinpoints,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(out)
    transformers.LlavaNextProcessor(
        image_processor=image_processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                            image_grid_pinpoints=pinpoints),
        tokenizer=llava_processor.tokenizer, patch_size=8, vision_feature_select_strategy="default",
        chat_template=llava_processor.chat_template, image_token="<image>", num_additional_image_tokens=1,
    ).save_pretrained(out)
    return LoadedModel(RunnerSettings(model=str(out)))


def test_llava_next_images_of_different_shapes_batch_and_score_like_a_full_forward(tiny_models, tmp_path):
    next_model = _tiny_llava_next(tiny_models["captioner"], tmp_path / "tiny-llava-next")
    assert type(next_model.model).__name__ == "LlavaNextForConditionalGeneration"
    items = _items_showing_shapes(tmp_path, [(96, 40), (40, 96), (60, 60)])  # 3 different anyres grids
    enc = PromptEncoder(next_model, max_length=2048)
    enc.check_image_support()
    fitted, encoded = _encode(enc, _user(5), items)
    patches = {e.vision["pixel_values"].shape[1] for e in encoded if e.vision}
    assert len(patches) > 1 and all("image_sizes" in e.vision for e in encoded if e.vision)
    kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": next_model.device, "dtype": next_model.dtype}
    # One batch mixes the patch counts (zero-padded to the largest); the reference sees each image alone.
    shared = score_shared_prefix(next_model.model, fitted.ids, encoded, pad_id=next_model.tokenizer.pad_token_id,
                                 batch_size=len(encoded), **kw)
    naive = score_naive(next_model.model, fitted.ids, encoded, **kw)
    np.testing.assert_allclose(shared, naive, atol=1e-4, rtol=0)
    assert np.ptp(naive) > 1e-6
    _assert_prefix_attention_scores_like_the_cache(next_model, fitted, encoded, kw)
    _assert_a_mixed_batch_trains_like_its_rows_alone(next_model, enc, fitted, encoded)


@pytest.mark.parametrize("family", IDEFICS_FAMILIES)
def test_idefics_tiles_of_different_counts_batch_and_score_like_a_full_forward(tiny_models, tmp_path, family):
    """Idefics3 / SmolVLM split an image into a varying number of tiles with a pixel_attention_mask; a batch pads
    both with zero tiles, which the model skips as its own processor's padding. Scores equal a forward each."""
    model = tiny_idefics(tiny_models["captioner"], family)
    assert model.model.config.model_type == family
    items = _items_showing_shapes(tmp_path, [(192, 80), (80, 192), (40, 30)])
    enc = PromptEncoder(model, max_length=4096)
    enc.check_image_support()
    fitted, encoded = _encode(enc, _user(5), items)
    tiles = {e.vision["pixel_values"].shape[1] for e in encoded if e.vision}
    assert len(tiles) > 1 and all(set(e.vision) == {"pixel_values", "pixel_attention_mask"} for e in encoded if e.vision)
    kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": model.device, "dtype": model.dtype}
    naive = score_naive(model.model, fitted.ids, encoded, **kw)
    assert np.ptp(naive) > 1e-6
    for batch_size in (len(encoded), 3):
        shared = score_shared_prefix(model.model, fitted.ids, encoded, pad_id=model.tokenizer.pad_token_id,
                                     batch_size=batch_size, **kw)
        np.testing.assert_allclose(shared, naive, atol=1e-4, rtol=0)
    _assert_prefix_attention_scores_like_the_cache(model, fitted, encoded, kw)
    _assert_a_mixed_batch_trains_like_its_rows_alone(model, enc, fitted, encoded)
    names = lora_target_modules(model.model)
    assert names and all(".text_model." in n for n in names)  # not the vision model or the connector


def test_gemma3_bidirectional_images_and_sliding_window_score_like_a_full_forward(tiny_models, tmp_path,
                                                                                  monkeypatch):
    """Gemma 3: an image's soft tokens attend to each other both ways (token_type_ids, which the model reads by key
    position, so a suffix's types follow the cached prefix's), and its sliding-window layer counts distance in
    cache slots, so padding between the prefix and a short suffix would move the window: where it can bind, the
    scorer pads suffixes on the right and reads each row's answer at its own last token. Scores equal the model's
    own full forward per candidate, in mixed-length batches too."""
    import transformers

    import srec.recommender.scoring as scoring

    plan = scoring.plan_batches
    gemma = tiny_gemma3(tiny_models["captioner"])
    items = _items_showing_shapes(tmp_path, [(192, 80), (80, 192), (40, 30)])
    enc = PromptEncoder(gemma, max_length=2048)
    enc.check_image_support()
    fitted, encoded = _encode(enc, _user(5), items)
    assert len(fitted.ids) > GEMMA3_SLIDING_WINDOW and len({len(e.ids) for e in encoded}) > 1
    assert scoring.sliding_window(gemma.model) == GEMMA3_SLIDING_WINDOW
    assert not prefix_attention_applies(gemma.model)  # both the window and the two-way image spans rule it out
    with Image.open(items[0].image_path) as im:
        out = gemma.processor(text=[enc.render(_user(5), items[0])[1]], images=[im.convert("RGB")],
                              add_special_tokens=False, return_tensors="pt")
    assert torch.equal(scoring.token_type_inputs(gemma.model, out["input_ids"])["token_type_ids"],
                       out["token_type_ids"].long())  # what the processor marks
    kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": gemma.device, "dtype": gemma.dtype}
    pad = gemma.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="does not apply to Gemma3ForConditionalGeneration"):
        score_shared_prefix(gemma.model, fitted.ids, encoded, pad_id=pad, batch_size=3, prefix_attention=True, **kw)
    naive = score_naive(gemma.model, fitted.ids, encoded, **kw)
    assert np.ptp(naive) > 1e-3
    # The image tokens' two-way attention moves these scores by about 7e-5 on this random model: the tolerance
    # here is tighter than elsewhere (seen agreeing to 6e-8).
    batches = []
    with monkeypatch.context() as m:
        m.setattr(scoring, "plan_batches", lambda lengths, *a, **k: batches.append(plan(lengths, *a, **k)) or batches[-1])
        for batch_size in (len(encoded), 3):
            shared = score_shared_prefix(gemma.model, fitted.ids, encoded, pad_id=pad, batch_size=batch_size, **kw)
            np.testing.assert_allclose(shared, naive, atol=5e-6, rtol=0)
        # ... and where transformers takes no per-row logits positions: the rows' distinct last positions
        m.delattr(transformers.modeling_utils, "slice_logits_to_keep")
        shared = score_shared_prefix(gemma.model, fitted.ids, encoded, pad_id=pad, batch_size=len(encoded), **kw)
        np.testing.assert_allclose(shared, naive, atol=5e-6, rtol=0)
    lengths = [len(e.ids) for e in encoded]
    assert any(len({lengths[i] for i in b}) > 1 for planned in batches for b in planned)  # padded batches ran
    _assert_a_mixed_batch_trains_like_its_rows_alone(gemma, enc, fitted, encoded)
    names = lora_target_modules(gemma.model)
    assert names and all(".language_model." in n for n in names)  # not the SigLIP tower or the projector
    # Not vacuous: without the token types the image rows miss (seen: by 7.3e-5) ...
    with monkeypatch.context() as m:
        m.setattr(scoring, "token_type_inputs", lambda model, ids, cached=0: {})
        no_types = score_shared_prefix(gemma.model, fitted.ids, encoded, pad_id=pad, batch_size=3, **kw)
    assert np.abs(no_types - naive)[:-1].max() > 1e-5
    # ... and with left-padded batches under the window, far more (seen: by 0.38).
    with monkeypatch.context() as m:
        m.setattr(scoring, "sliding_window", lambda model: None)
        padded = score_shared_prefix(gemma.model, fitted.ids, encoded, pad_id=pad, batch_size=len(encoded), **kw)
    assert np.abs(padded - naive).max() > 1e-3


def test_a_sliding_window_takes_the_shared_prefix_attention_only_where_it_cannot_bind(tiny_models, images):
    """A Mistral text model (plain causal attention in a sliding window): where every prompt fits inside the window
    the suffixes attend through the shared-prefix attention; where one does not, through the cache view with the
    model's windowed mask. Both score like the model's own full forward."""
    import srec.recommender.scoring as scoring

    for window, applies in ((4096, True), (48, False)):
        mistral = tiny_llava_mistral(tiny_models["captioner"], window)
        assert mistral.model.config.text_config.model_type == "mistral"
        enc = PromptEncoder(mistral, max_length=1024)
        fitted, encoded = _encode(enc, _user(5), _items(images))
        longest = len(fitted.ids) + max(len(e.ids) for e in encoded)
        assert scoring.sliding_window(mistral.model) == window and (longest < window) == applies
        assert prefix_attention_applies(mistral.model, longest) == applies
        assert not prefix_attention_applies(mistral.model)  # without the prompts' length: the window could bind
        kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": mistral.device, "dtype": mistral.dtype}
        pad = mistral.tokenizer.pad_token_id
        naive = score_naive(mistral.model, fitted.ids, encoded, **kw)
        assert np.ptp(naive) > 1e-6
        shared = score_shared_prefix(mistral.model, fitted.ids, encoded, pad_id=pad, batch_size=3, **kw)
        np.testing.assert_allclose(shared, naive, atol=1e-4, rtol=0)
        if applies:
            _assert_prefix_attention_scores_like_the_cache(mistral, fitted, encoded, kw, longest)
        else:
            with pytest.raises(ValueError, match="a sliding window that binds"):
                score_shared_prefix(mistral.model, fitted.ids, encoded, pad_id=pad, batch_size=3,
                                    prefix_attention=True, **kw)


@pytest.mark.parametrize("family", QWEN_VL_FAMILIES)
def test_qwen_vl_images_take_3d_positions_on_the_shared_prefix_like_a_full_forward(tiny_models, tmp_path,
                                                                                   monkeypatch, family):
    """Qwen2-VL image tokens take (time, height, width) rotary positions and the text after an image resumes at
    its largest position + 1: a suffix scored on a cached prefix must get the positions it has in the whole
    prompt, which the model computes itself in the naive forward. Images of three shapes give three grids."""
    import srec.recommender.encoding as encoding

    qwen = tiny_qwen_vl(tiny_models["captioner"], family)
    assert qwen.model.config.model_type == family
    items = _items_showing_shapes(tmp_path, [(192, 80), (80, 192), (120, 120)])  # up to 16 x 16 patches
    enc = PromptEncoder(qwen, max_length=2048)
    enc.check_image_support()
    fitted, encoded = _encode(enc, _user(5), items)
    grids = {tuple(e.vision["image_grid_thw"][0].tolist()) for e in encoded if e.vision}
    assert len(grids) == 3 and all(set(e.vision) == {"pixel_values", "image_grid_thw"} for e in encoded if e.vision)
    # The token types the scorer rebuilds from the ids are the processor's own.
    suffix = enc.render(_user(5), items[0])[1]
    with Image.open(items[0].image_path) as im:
        out = qwen.processor(text=[suffix], images=[im.convert("RGB")], add_special_tokens=False, return_tensors="pt")
    assert torch.equal(encoding.image_token_types(qwen.model, out["input_ids"]), out["mm_token_type_ids"].int())
    kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": qwen.device, "dtype": qwen.dtype}
    pad = qwen.tokenizer.pad_token_id
    naive = score_naive(qwen.model, fitted.ids, encoded, **kw)
    assert np.ptp(naive) > 1e-6
    for batch_size in (len(encoded), 3):  # one batch mixing grids and a text row; several batches
        shared = score_shared_prefix(qwen.model, fitted.ids, encoded, pad_id=pad, batch_size=batch_size, **kw)
        np.testing.assert_allclose(shared, naive, atol=1e-4, rtol=0)
    _assert_prefix_attention_scores_like_the_cache(qwen, fitted, encoded, kw)
    _assert_a_mixed_batch_trains_like_its_rows_alone(qwen, enc, fitted, encoded)
    # The check is not vacuous: with the 1-D positions a LLaVA gets, the image rows miss the tolerance above
    # (seen: by up to 2.9e-3 on Qwen2-VL, 5.1e-4 on Qwen2.5-VL and 0.083 on Qwen3-VL; the right positions
    # agree to 1.2e-7).
    monkeypatch.setattr(encoding, "mrope_index", lambda model: None)
    flat = score_shared_prefix(qwen.model, fitted.ids, encoded, pad_id=pad, batch_size=len(encoded), **kw)
    assert np.abs(flat - naive)[:-1].max() > 2e-4 and abs(flat[-1] - naive[-1]) < 1e-4  # the text row agrees
    monkeypatch.undo()
    # Under a PEFT adapter (as trained and scored): LoRA leaves the vision tower and its merger alone, and the
    # positions still come from the wrapped model's own rope index.
    from peft import LoraConfig, get_peft_model

    names = lora_target_modules(qwen.model)
    assert names and not any(".visual." in n or "merger" in n or "lm_head" in n for n in names)
    peft = get_peft_model(qwen.model, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.eval()
    adapted = score_naive(peft, fitted.ids, encoded, **kw)
    assert np.abs(adapted - naive).max() > 1e-3
    np.testing.assert_allclose(score_shared_prefix(peft, fitted.ids, encoded, pad_id=pad, batch_size=3, **kw), adapted,
                               atol=1e-4, rtol=0)


def test_vision_batch_pads_patches_and_refuses_mixed_inputs():
    from srec.recommender.encoding import vision_batch

    small = {"pixel_values": torch.ones(1, 3, 3, 4, 4), "image_sizes": torch.tensor([[32, 32]])}
    large = {"pixel_values": torch.full((1, 5, 3, 4, 4), 2.0), "image_sizes": torch.tensor([[64, 32]])}
    out = vision_batch([small, None, large], "cpu", torch.bfloat16)  # the text-only row adds nothing
    assert out["pixel_values"].shape == (2, 5, 3, 4, 4) and out["pixel_values"].dtype == torch.bfloat16
    assert out["pixel_values"][0, 3:].abs().sum() == 0 and out["pixel_values"][1].min() == 2
    assert out["image_sizes"].dtype == torch.long and out["image_sizes"].tolist() == [[32, 32], [64, 32]]
    assert vision_batch([None, None], "cpu", torch.float32) == {}
    with pytest.raises(PromptError, match="different processor inputs"):
        vision_batch([{"pixel_values": torch.ones(1, 5, 3, 4, 4)}, large], "cpu", torch.float32)


def test_a_processor_with_unsupported_image_inputs_is_a_clear_error(tiny_models, images):
    """Image inputs srec has not checked for the model's family (here an Idefics3 processor's pixel_attention_mask
    beside a model of no known type) are a named error, before any generation, not a failure deep in a forward
    pass or a wrong score."""
    from types import SimpleNamespace

    import transformers
    from transformers import AutoProcessor, Idefics3Processor

    image_processor_cls = getattr(transformers, "Idefics3ImageProcessorPil", None) or transformers.Idefics3ImageProcessor
    llava_processor = AutoProcessor.from_pretrained(tiny_models["captioner"])
    tok = llava_processor.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>"]})
    processor = Idefics3Processor(image_processor=image_processor_cls(size={"longest_edge": 64},
                                                                      max_image_size={"longest_edge": 32}),
                                  tokenizer=tok, image_seq_len=4, chat_template=llava_processor.chat_template)
    enc = PromptEncoder(SimpleNamespace(tokenizer=tok, processor=processor), max_length=1024)
    with pytest.raises(PromptError, match=r"Idefics3Processor returns \['pixel_attention_mask'\].*'text' modality"):
        enc.check_image_support()
    suffix = enc.render(_user(), ItemView("Title: x", images[0]))[1]
    with pytest.raises(PromptError, match="Idefics3"):
        enc.encode_item(suffix, images[0])
    enc.encode_item(enc.render(_user(), ItemView("Title: x", None))[1], None)  # text items still encode
    # A 3-D-position family srec has not checked against a full forward is refused; Qwen2-VL's inputs pass.
    from srec.recommender.encoding import check_vision_inputs

    qwen_keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"]
    with pytest.raises(PromptError, match=r"Glm4vProcessor returns \['image_grid_thw', 'mm_token_type_ids'\].*not checked"):
        check_vision_inputs(qwen_keys, "Glm4vProcessor", "glm4v")
    check_vision_inputs(qwen_keys, "Qwen2VLProcessor", "qwen2_vl")


def test_suffixes_showing_one_image_share_its_pixels(llava, images):
    """Chain-of-thought suffixes differ per (user, candidate); the candidate's pixels are held once."""
    enc = PromptEncoder(llava, max_length=1024, cot=True)
    a = enc.encode_item(enc.render(_user(), ItemView("Title: x", images[0]), "matches the brushes")[1], images[0])
    b = enc.encode_item(enc.render(_user(), ItemView("Title: x", images[0]), "does not match")[1], images[0])
    c = enc.encode_item(enc.render(_user(), ItemView("Title: x", images[1]), "does not match")[1], images[1])
    assert a.ids != b.ids and a.vision is b.vision and c.vision is not a.vision


def test_cached_pixels_are_in_the_model_dtype_and_score_as_before(tiny_models, images):
    """A bf16 model's encoder keeps its candidates' pixels in bf16 (half the memory of the processor's float32); the
    scores equal those from float32 pixels cast per batch, as vision_batch did before."""
    bf16 = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"]), dtype="bfloat16"))
    enc = PromptEncoder(bf16, max_length=1024)
    fitted, encoded = _encode(enc, _user(), _items(images))
    pixels = [e.vision["pixel_values"] for e in encoded if e.vision]
    assert pixels and all(t.dtype == torch.bfloat16 for t in pixels)
    as_before = PromptEncoder(bf16, max_length=1024)
    as_before.vision_dtype = None  # the processor's float32, cast to bf16 by vision_batch
    _, float32 = _encode(as_before, _user(), _items(images))
    assert all(e.vision["pixel_values"].dtype == torch.float32 for e in float32 if e.vision)
    kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": bf16.device, "dtype": bf16.dtype,
          "pad_id": bf16.tokenizer.pad_token_id, "batch_size": 8}
    np.testing.assert_array_equal(score_shared_prefix(bf16.model, fitted.ids, encoded, **kw),
                                  score_shared_prefix(bf16.model, fitted.ids, float32, **kw))


def test_token_ids_hold_one_int_object_per_id_and_training_rows_share_their_parts(tiny_models, images):
    """An encoder's ids are the tokenizer's, with one int object per distinct id across every prefix and suffix
    (ids past 256 are otherwise an object per position); a training row keeps the prefix and suffix lists it was
    made from instead of a joined copy, and its ids are still the whole row."""
    loaded = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"])))
    enc = PromptEncoder(loaded, max_length=1024)
    fitted, encoded = _encode(enc, _user(), _items(images))
    plain = loaded.tokenizer(fitted.text, add_special_tokens=False)["input_ids"]
    assert fitted.ids == plain and enc.token_ids(fitted.text) == plain
    every = [*fitted.ids, *(i for e in encoded for i in e.ids)]
    large = [i for i in every if i > 256]  # CPython keeps one object for each of -5..256 anyway
    assert len(large) > 2 * len(set(large))  # ids that repeat, in prefixes and across candidates
    assert len({id(i) for i in large}) == len(set(large))
    assert len({id(i) for i in plain if i > 256}) > len({i for i in plain if i > 256})  # the tokenizer's own list
    rows = [make_row(fitted.ids, e, enc.answer_ids[YES if k % 2 else NO]) for k, e in enumerate(encoded)]
    assert all(r.prefix is fitted.ids and r.suffix is e.ids for r, e in zip(rows, encoded))
    assert rows[1].ids == fitted.ids + encoded[1].ids + enc.answer_ids[YES]
    assert rows[1].length == len(rows[1].ids) and (rows[1].prefix_len, rows[1].answer_len) == (
        len(fitted.ids), len(enc.answer_ids[YES]))


def test_image_tensors_past_the_memory_budget_are_memory_mapped_and_score_the_same(llava, images, tmp_path):
    """Past its in-memory budget an encoder's image tensors live in memory-mapped files (page cache, not process
    memory), unlinked at once; prompts built on them score exactly as on tensors in memory."""
    from srec.recommender.encoding import PixelStore

    in_memory = PromptEncoder(llava, max_length=1024)
    fitted, encoded = _encode(in_memory, _user(), _items(images))
    one_image = sum(t.numel() * t.element_size() for t in encoded[0].vision.values())
    spilling = PromptEncoder(llava, max_length=1024, pixels=PixelStore(one_image, tmp_path / "pixels"))
    _, mapped = _encode(spilling, _user(), _items(images))
    shown = {it.image_path for it in _items(images) if it.image_path}
    assert len(shown) > 1 and spilling.pixels.resident_bytes == one_image
    assert spilling.pixels.mapped_bytes == one_image * (len(shown) - 1)
    files = [e.vision["pixel_values"].untyped_storage().filename for e in mapped if e.vision]
    assert sum(f is not None for f in files) == sum(1 for e in mapped if e.vision and e.vision is not mapped[0].vision)
    assert list((tmp_path / "pixels").iterdir()) == []  # unlinked: the mappings hold the data
    for a, b in zip(encoded, mapped):
        assert a.ids == b.ids and (a.vision is None) == (b.vision is None)
        assert a.vision is None or all(torch.equal(a.vision[k], b.vision[k]) for k in a.vision)
    kw = {"yes_id": in_memory.yes_id, "no_id": in_memory.no_id, "device": llava.device, "dtype": llava.dtype,
          "pad_id": llava.tokenizer.pad_token_id, "batch_size": 8}
    np.testing.assert_array_equal(score_shared_prefix(llava.model, fitted.ids, encoded, **kw),
                                  score_shared_prefix(llava.model, fitted.ids, mapped, **kw))


def test_prompts_encoded_a_chunk_of_users_at_a_time_are_those_encoded_at_once(llava, images):
    """Scoring plans a split's prompts once (chain-of-thought reasoning generated for every pair together) and
    encodes and scores them a chunk of users at a time: the same prefixes, suffix ids and scores as all at once.
    A chain-of-thought suffix (one a user and candidate) is not kept by the encoder; a plain item suffix is."""
    from srec.recommender.data import ItemInfo, UserContext
    from srec.recommender.pipeline import cot_generator, encode_prompts, plan_prompts, score_prompts

    items = {f"i{k}": ItemInfo(t, None, None, "A product.", f"A photo of {t}.", images[k % len(images)])
             for k, t in enumerate(TITLES)}
    ids = list(items)
    groups = [(UserContext(f"u{u}", "test", 5, ids[u % len(ids)], "User profile: 5 purchases.",
                           tuple(ids[(u + 1 + j) % len(ids)] for j in range(4)), {"recurrent": "Likes skin care."}),
               [ids[(u + j) % len(ids)] for j in range(4)]) for u in range(5)]
    settings = RecommenderSettings(cot_max_new_tokens=6)
    for name in ("zero-shot:fused+recurrent", "zero-shot:fused+recurrent+cot"):
        variant = Variant.parse(name)
        planner = PromptEncoder(llava, max_length=1024, cot=variant.cot)
        plan = plan_prompts(planner, variant, groups, items, settings,
                            cot_generator(llava, settings) if variant.cot else None)
        whole = encode_prompts(PromptEncoder(llava, max_length=1024, cot=variant.cot), plan)
        chunked_encoder = PromptEncoder(llava, max_length=1024, cot=variant.cot)
        chunks = [encode_prompts(chunked_encoder, plan, start, start + 2) for start in range(0, len(groups), 2)]
        assert [len(c) for c in chunks] == [2, 2, 1]
        chunked = [up for c in chunks for up in c]
        assert [up.prefix_ids for up in chunked] == [up.prefix_ids for up in whole]
        assert [[e.ids for e in up.encoded] for up in chunked] == [[e.ids for e in up.encoded] for up in whole]
        assert all(r is not None for up in whole for r in up.reasoning) is variant.cot
        assert len(chunked_encoder._items) == (0 if variant.cot else len({i for _, c in groups for i in c}))
        scores = [s for c in chunks for s in score_prompts(llava.model, c, chunked_encoder, settings, llava)]
        np.testing.assert_array_equal(np.concatenate(scores),
                                      np.concatenate(score_prompts(llava.model, whole, chunked_encoder, settings,
                                                                   llava)))


def test_the_in_memory_image_budget_comes_from_the_environment(monkeypatch):
    from srec.recommender.encoding import PIXELS_IN_MEMORY_BYTES, PixelStore

    monkeypatch.delenv("SREC_PIXELS_IN_MEMORY_GIB", raising=False)
    assert PixelStore().in_memory_bytes == PIXELS_IN_MEMORY_BYTES == 2 << 30
    monkeypatch.setenv("SREC_PIXELS_IN_MEMORY_GIB", "0.5")
    assert PixelStore().in_memory_bytes == 1 << 29
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv("SREC_PIXELS_IN_MEMORY_GIB", bad)
        with pytest.raises(ValueError, match="SREC_PIXELS_IN_MEMORY_GIB"):
            PixelStore()


def test_loss_covers_only_the_answer_tokens(llava, images):
    enc = PromptEncoder(llava, max_length=1024)
    fitted, encoded = _encode(enc, _user(), _items(images)[:4])
    rows = [make_row(fitted.ids, e, enc.answer_ids[YES if i % 2 else NO]) for i, e in enumerate(encoded)]
    width = max(r.answer_len for r in rows)
    labels = answer_labels(rows, width)
    for r, lab in zip(rows, labels):
        kept = lab[lab != -100].tolist()
        assert kept == r.ids[-r.answer_len:] and len(kept) == r.answer_len  # the answer, nothing before it
    # The loss equals cross-entropy over exactly those tokens of a full forward's logits.
    loss = answer_loss(llava.model, rows, llava.tokenizer.pad_token_id, llava.device, llava.dtype)
    inputs = batch_inputs(llava.model, rows, llava.tokenizer.pad_token_id, llava.device, llava.dtype)
    with torch.no_grad():
        logits = llava.model(**inputs).logits
    targets = inputs["input_ids"].clone()
    mask = torch.zeros_like(targets, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, -r.answer_len:] = True
    pred = logits[:, :-1][mask[:, 1:]]
    manual = torch.nn.functional.cross_entropy(pred.float(), targets[mask])
    assert abs(loss.item() - manual.item()) < 1e-5


def test_lora_targets_the_language_model_only(llava):
    names = lora_target_modules(llava.model)
    assert names and all(".language_model." in n for n in names)
    assert not any(p in n for n in names for p in ("vision_tower", "multi_modal_projector", "lm_head"))
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}


def _random_adapter(model, *, seed: int):
    """``model`` wrapped with srec's LoRA layout, B drawn at random: as if trained, the adapter changes the scores."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1,
                                            target_modules=lora_target_modules(model)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return peft


def test_saved_adapter_reloads_with_peft_and_reproduces_scores(tiny_models, images, tmp_path):
    from peft import PeftModel

    base = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"])))
    enc = PromptEncoder(base, max_length=1024)
    fitted, encoded = _encode(enc, _user(), _items(images))
    kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": base.device, "dtype": base.dtype,
          "pad_id": base.tokenizer.pad_token_id, "batch_size": 8}
    before = score_shared_prefix(base.model, fitted.ids, encoded, **kw)
    peft = _random_adapter(base.model, seed=0).eval()
    trained = score_shared_prefix(peft, fitted.ids, encoded, **kw)
    assert np.abs(trained - before).max() > 1e-3
    peft.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    fresh = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"])))
    reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(score_shared_prefix(reloaded, fitted.ids, encoded, **kw), trained, atol=1e-6)


def test_one_base_serves_adapter_and_zero_shot_variants_in_turn(tiny_models, images, tmp_path):
    """What recommender_scores and the promotion gate do with the step's one base: attach a variant's adapter, score,
    detach; the next variant (another adapter, or none) scores exactly as on a freshly loaded base."""

    def load():
        return LoadedModel(RunnerSettings(model=str(tiny_models["captioner"])))

    adapters = {}
    for seed in (0, 1):  # two adapters "as if trained", saved as srec saves them
        _random_adapter(load().model, seed=seed).save_pretrained(tmp_path / f"adapter{seed}")
        adapters[seed] = tmp_path / f"adapter{seed}"

    shared = load()
    enc = PromptEncoder(shared, max_length=1024)
    fitted, encoded = _encode(enc, _user(), _items(images))
    kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": shared.device, "dtype": shared.dtype,
          "pad_id": shared.tokenizer.pad_token_id, "batch_size": 8}
    layers = [type(m).__name__ for m in shared.model.modules()]
    weights = {n: p.detach().clone() for n, p in shared.model.state_dict().items()}
    turns = [0, None, 1, 0, None]
    on_shared = []
    for turn in turns:
        with attached_adapter(shared.model, adapters.get(turn)) as model:
            on_shared.append(score_shared_prefix(model, fitted.ids, encoded, **kw))
    assert [type(m).__name__ for m in shared.model.modules()] == layers and not hasattr(shared.model, "peft_config")
    assert all(torch.equal(weights[n], p) for n, p in shared.model.state_dict().items())
    for turn, scores in zip(turns, on_shared):
        fresh = load()
        with attached_adapter(fresh.model, adapters.get(turn)) as model:
            np.testing.assert_array_equal(scores, score_shared_prefix(model, fitted.ids, encoded, **kw))
    assert np.abs(on_shared[0] - on_shared[1]).max() > 1e-3 and np.abs(on_shared[0] - on_shared[2]).max() > 1e-3


def test_reasoning_step_is_the_base_models_at_its_own_length(tiny_models, images):
    """Chain of thought: the adapter is disabled while the reasoning is generated (PEFT wraps the base in place),
    and the step is ``cot_max_new_tokens`` long, whatever the resource's generation length."""
    from peft import LoraConfig, get_peft_model

    from srec.models.generation import GenerationRequest
    from srec.recommender.pipeline import cot_generator

    base = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"]), max_new_tokens=48))
    settings = RecommenderSettings(cot_max_new_tokens=6)
    reqs = [GenerationRequest(prompt=f"Does a shopper of {t} like a mascara?", image_path=images[i % 3])
            for i, t in enumerate(TITLES[:3])]
    before = cot_generator(base, settings)(reqs)
    assert all(1 <= r.generated_tokens <= 6 for r in before)
    peft = get_peft_model(base.model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_modules(base.model)))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.eval()
    assert base.generate(reqs, max_new_tokens=6) != before  # the adapter is live in the base's modules
    assert cot_generator(base, settings, peft)(reqs) == before


def test_qlora_on_cpu_is_a_clear_error(tiny_models):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 4-bit loading is allowed")
    with pytest.raises(ModelLoadError, match="bitsandbytes, which needs CUDA"):
        LoadedModel(RunnerSettings(model=str(tiny_models["captioner"]), quantization="4bit"))


def test_mean_auc_counts_ties_half():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.1], [0.3, 0.3, 0.3]])
    assert mean_auc(scores, 3) == pytest.approx((1.0 + 0.25 + 0.5) / 3)



def test_choice_stats_separate_the_yes_no_choice_from_the_answer_format():
    import torch

    from srec.recommender.training import TrainRow, answer_labels, choice_stats

    yes, no, dot, eos = 5, 6, 7, 3
    rows = [TrainRow((), [1, 2], [yes, dot, eos]), TrainRow((), [1], [no, dot, eos]),
            TrainRow((), [1, 2], [no, eos])]  # a shorter answer: its choice is one position later
    labels = answer_labels(rows, 3)
    logits = torch.full((3, 3, 10), -30.0)
    logits[0, 0, [yes, no]] = torch.tensor([2.0, 0.0])      # right, P(yes) = sigmoid(2)
    logits[1, 0, [yes, no, 9]] = torch.tensor([0.0, 0.0, 0.0])  # chance, a third of the mass elsewhere
    logits[2, 1, [yes, no]] = torch.tensor([1.0, 0.0])      # wrong, P(no) = sigmoid(-1)
    log_loss, mass = choice_stats(logits, labels, rows, yes, no)
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0) + math.log1p(math.exp(1.0))) / 3
    assert log_loss == pytest.approx(expected, rel=1e-5)
    assert mass == pytest.approx((1.0 + 2 / 3 + 1.0) / 3, rel=1e-5)


def test_training_resumes_from_its_last_checkpoint(tiny_models, images, tmp_path):
    from safetensors.torch import load_file

    from srec.recommender.training import train_lora

    settings = RecommenderSettings(epochs=3, batch_size=4, patience=0, learning_rate=5e-3)
    calls = {"n": 0}

    def rows_and_model():
        base = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"])))
        enc = PromptEncoder(base, max_length=1024)
        fitted, encoded = _encode(enc, _user(), _items(images))
        rows = [make_row(fitted.ids, e, enc.answer_ids[YES if i % 3 == 0 else NO]) for i, e in enumerate(encoded)]
        return base, rows

    def validate(model):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 0, epoch 1, then "killed" while validating epoch 2
            raise KeyboardInterrupt
        return 0.5 + 0.01 * calls["n"]

    base, rows = rows_and_model()
    kw = {"pad_id": base.tokenizer.pad_token_id, "device": base.device, "dtype": base.dtype,
          "work_dir": tmp_path / "work", "run_key": "k1", "log": lambda m: None}
    with pytest.raises(KeyboardInterrupt):
        train_lora(base.model, rows, validate, settings, **kw)
    assert (tmp_path / "work" / "checkpoint" / "trainer_state.pt").is_file()

    base, rows = rows_and_model()
    _, result = train_lora(base.model, rows, validate, settings, **kw)
    assert result.resumed_from_epoch == 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.epochs_run == 3
    assert result.best_epoch == 3  # validation kept improving

    # The resumed run ends where an uninterrupted one does: optimizer, schedule and the dropout RNG carried over.
    base, rows = rows_and_model()
    train_lora(base.model, rows, lambda m: 0.5, settings, **{**kw, "work_dir": tmp_path / "whole"})
    last = lambda d: load_file(d / "checkpoint" / "last" / "adapter_model.safetensors")  # noqa: E731
    resumed, whole = last(tmp_path / "work"), last(tmp_path / "whole")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)

    # Killed between the two renames of a commit: the previous checkpoint is taken back, nothing is retrained.
    (tmp_path / "work" / "checkpoint").rename(tmp_path / "work" / "checkpoint.old")
    base, rows = rows_and_model()
    _, again = train_lora(base.model, rows, validate, settings, **kw)
    assert again.resumed_from_epoch == 3 and again.epochs_run == 3 and again.best_epoch == 3

    # An unreadable state file: said so, and training starts over.
    (tmp_path / "work" / "checkpoint" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    said = []
    base, rows = rows_and_model()
    _, fresh = train_lora(base.model, rows, lambda m: 0.5, settings, **{**kw, "log": said.append})
    assert fresh.resumed_from_epoch == 0 and fresh.epochs_run == 3
    assert any("is unreadable" in m and "starting over" in m for m in said)

    base, rows = rows_and_model()  # another configuration: starts over instead of resuming
    _, other = train_lora(base.model, rows, validate, RecommenderSettings(epochs=1, batch_size=4, patience=0),
                          **{**kw, "run_key": "k2"})
    assert other.resumed_from_epoch == 0 and other.epochs_run == 1


def test_shared_prefix_training_gathers_the_prefix_with_a_backward_that_sums_in_a_fixed_order(llava, images):
    """Each row's copy of its group's prefix keys and values comes from index_select, whose backward (index_add)
    sums a group's rows in a fixed order. Advanced indexing's backward (index_put with accumulate) adds floats
    atomically across CPU threads: the demo's fused+none adapter, trained 3 times on 2 threads that way, came out
    with 2 different weight hashes; with index_select 4 times with one (the one torch.use_deterministic_algorithms
    gives)."""
    enc = PromptEncoder(llava, max_length=1024)
    rows = []
    for n_history in (2, 6):
        fitted, encoded = _encode(enc, _user(n_history), _items(images)[::2])
        rows += [make_row(fitted.ids, e, enc.answer_ids[YES if i % 2 else NO]) for i, e in enumerate(encoded)]
    loss = answer_loss(llava.model, rows, llava.tokenizer.pad_token_id, llava.device, llava.dtype)
    backward, stack, seen = [], [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            backward.append(type(fn).__name__)
            stack += [f for f, _ in fn.next_functions]
    layers = llava.model.config.text_config.num_hidden_layers
    assert backward.count("IndexSelectBackward0") == 2 * layers  # keys and values of every layer
    assert "IndexBackward0" not in backward and "IndexPutBackward0" not in backward


def test_a_short_last_accumulation_window_weighs_like_a_full_one(tiny_models, images):
    """Gradient accumulation divides each loss by its own window's size: one batch with grad_accumulation 4 makes
    the same step as with 1 (a plain SGD step on the output head, clipping out of the way)."""
    from srec.recommender.training import train_epoch

    def step(grad_accumulation: int):
        base = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"])))
        enc = PromptEncoder(base, max_length=1024)
        fitted, encoded = _encode(enc, _user(), _items(images)[:4])
        rows = [make_row(fitted.ids, e, enc.answer_ids[YES if i % 2 else NO]) for i, e in enumerate(encoded)]
        for p in base.model.parameters():
            p.requires_grad_(False)
        head = base.model.get_output_embeddings().weight
        head.requires_grad_(True)
        before = head.detach().clone()
        settings = RecommenderSettings(batch_size=4, grad_accumulation=grad_accumulation, max_grad_norm=1e9)
        train_epoch(base.model, rows, torch.optim.SGD([head], lr=1.0), [head], settings, 1,
                    pad_id=base.tokenizer.pad_token_id, device=base.device, dtype=base.dtype)
        return head.detach() - before

    full = step(1)
    assert full.abs().max() > 0
    torch.testing.assert_close(step(4), full)


def test_rows_sharing_a_prefix_train_on_one_encoding_of_it_with_the_same_loss_and_gradients(llava, images):
    """Two users' rows mixed in one batch (prefixes of different lengths; images and text-only suffixes): each
    prefix encoded once and its rows run on its keys and values give the loss and every parameter's gradient of
    the whole rows run alone (prefix_len 0: the plain left-padded forward)."""
    import dataclasses

    import srec.recommender.training as training

    enc = PromptEncoder(llava, max_length=1024)
    rows = []
    for n_history in (2, 6):
        fitted, encoded = _encode(enc, _user(n_history), _items(images)[::2])
        rows += [make_row(fitted.ids, e, enc.answer_ids[YES if i % 2 else NO]) for i, e in enumerate(encoded)]
    assert len(training.prefix_groups(rows)) == 2 and len({r.prefix_len for r in rows}) == 2
    plain = [dataclasses.replace(r, prefix=(), suffix=[*r.prefix, *r.suffix]) for r in rows]
    pad = llava.tokenizer.pad_token_id
    grads = []
    for batch, shared in ((rows, True), (plain, False)):
        calls = []
        original = training.shared_prefix_answer_logits
        training.shared_prefix_answer_logits = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            llava.model.zero_grad(set_to_none=True)
            loss = answer_loss(llava.model, batch, pad, llava.device, llava.dtype)
            loss.backward()
        finally:
            training.shared_prefix_answer_logits = original
        assert bool(calls) == shared
        grads.append((loss.item(), {n: p.grad.clone() for n, p in llava.model.named_parameters() if p.grad is not None}))
    llava.model.zero_grad(set_to_none=True)
    # Under gradient checkpointing transformers drops a training layer's cache: the rows then run whole.
    llava.model.gradient_checkpointing_enable()
    llava.model.train()
    try:
        calls = []
        original = training.shared_prefix_answer_logits
        training.shared_prefix_answer_logits = lambda *a, **k: calls.append(1) or original(*a, **k)
        checkpointed = answer_loss(llava.model, rows, pad, llava.device, llava.dtype).item()
    finally:
        training.shared_prefix_answer_logits = original
        llava.model.gradient_checkpointing_disable()
        llava.model.eval()
    assert not calls and checkpointed == pytest.approx(grads[1][0], abs=1e-5)  # no dropout in the tiny LLaVA
    (loss_shared, grad_shared), (loss_plain, grad_plain) = grads
    assert loss_shared == pytest.approx(loss_plain, abs=1e-5)
    assert grad_shared.keys() == grad_plain.keys() and any("embed_tokens" in n for n in grad_plain)
    for name, g in grad_plain.items():
        torch.testing.assert_close(grad_shared[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_length_batches_keep_a_prefix_s_rows_together_and_single_rows_as_before():
    from srec.recommender.training import TrainRow, length_batches

    rng = np.random.default_rng(0)
    singles = [TrainRow((), list(range(int(n) - 1)), [int(n) - 1]) for n in rng.integers(5, 50, 200)]

    def before(rows, batch_size, rng):  # length_batches as it was before prefix groups
        order = rng.permutation(len(rows))
        window = batch_size * 32
        batches = []
        for s in range(0, len(order), window):
            chunk = sorted(order[s:s + window].tolist(), key=lambda i: len(rows[i].ids))
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    assert length_batches(singles, 4, np.random.default_rng(5)) == before(singles, 4, np.random.default_rng(5))
    # 60 targets of a prefix each, with 1 to 6 rows (a positive and its negatives)
    grouped = [TrainRow([t, t, t], [0] * (k - 1), [0]) for t in range(60) for k in range(1 + t % 6)]
    batches = length_batches(grouped, 4, np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(len(grouped))) and max(map(len, batches)) <= 4
    target_batches = {}
    for n, b in enumerate(batches):
        for i in b:
            target_batches.setdefault(grouped[i].ids[0], set()).add(n)
    for t, where in target_batches.items():  # a target in one batch, unless it has more rows than a batch takes
        assert len(where) == (1 if 1 + t % 6 <= 4 else 2), (t, where)


def test_sft_learns_the_answers_of_its_training_rows(tiny_models, images, tmp_path):
    """The gradient reaches the answer: training on nine rows (three "Yes.") takes the answer loss from above the
    uniform floor (ln 2048 = 7.6 nats) to below what the label prior alone allows (H(1/3) / 3 answer tokens =
    0.21 nats), and orders every "Yes." row above every "No." row. Needs an output head that can express a
    confident answer (the tiny model's LM_HEAD_SCALE); with the default init the loss stays at ~6.5."""
    from srec.recommender.training import train_lora

    base = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"])))
    enc = PromptEncoder(base, max_length=1024)
    fitted, encoded = _encode(enc, _user(), _items(images))
    labels = np.array([i % 3 == 0 for i in range(len(encoded))])
    rows = [make_row(fitted.ids, e, enc.answer_ids[YES if y else NO]) for e, y in zip(encoded, labels)]
    pad = base.tokenizer.pad_token_id

    def loss(model) -> float:
        return answer_loss(model, rows, pad, base.device, base.dtype).item()

    before = loss(base.model)
    # "Validation" is the training loss (negated: higher is better), so the adapter returned is the best fit.
    model, result = train_lora(base.model, rows, lambda m: -loss(m),
                               RecommenderSettings(epochs=40, batch_size=3, patience=0, learning_rate=3e-3,
                                                   lora_dropout=0.0, warmup_ratio=0.0),
                               pad_id=pad, device=base.device, dtype=base.dtype, work_dir=tmp_path / "w",
                               run_key="fit", choice_ids=(enc.yes_id, enc.no_id), log=lambda m: None)
    after = loss(model)
    assert before > 7.0 and after < 0.15, (before, after, result.history)
    # The per-epoch choice diagnostics follow the fit: the yes/no choice ends far below chance (ln 2 = 0.69)
    # with most of the mass on the two answer tokens (measured 0.85 here).
    first, last = result.history[0], result.history[-1]
    assert last["train_choice_log_loss"] < 0.2 < first["train_choice_log_loss"], result.history
    assert last["train_choice_mass"] > 0.5 > first["train_choice_mass"], result.history
    s = score_shared_prefix(model, fitted.ids, encoded, yes_id=enc.yes_id, no_id=enc.no_id, pad_id=pad, batch_size=8,
                            device=base.device, dtype=base.dtype)
    assert s[labels].min() > s[~labels].max(), s


def test_sft_generalises_a_planted_rule_to_unseen_items(tiny_models, tmp_path):
    """Training and scoring are wired to learn, not only to memorise: a rule over the candidate's title ("Yes." iff it
    has one of the words that together cover half of the real Beauty sample's titles), trained through
    ``train_lora`` on 600 real titles, is scored through the shared-prefix scorer on 80 titles training never saw.

    Built at hidden 128 from the tiny models' own recipe and tokenizer: at the shipped 64, LoRA cannot single out
    words among the frozen random token embeddings (held-out AUC ~0.70 here; ``bench/sft_tiny_capacity.py``).
    Measured: base 0.55, then 0.76, 0.90, 0.93 by epoch."""
    import csv
    import gzip
    from collections import Counter
    from dataclasses import replace

    from transformers import AutoTokenizer

    from srec.baselines.models import title_words
    from srec.models import tiny
    from srec.recommender.training import train_lora
    from tests.conftest import SAMPLE_DIR

    with gzip.open(SAMPLE_DIR / "item_titles.csv.gz", "rt", encoding="utf-8") as f:
        titles = [r["title"] for r in csv.DictReader(f) if r["title"]]

    def words(title: str) -> set[str]:
        return title_words(title) - {"the", "and", "for", "with"}  # title_overlap's words, less the emptiest

    chosen: set[str] = set()
    for w, _ in Counter(w for t in titles for w in words(t)).most_common():
        if sum(1 for t in titles if words(t) & chosen) >= len(titles) / 2:
            break
        chosen.add(w)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(titles))
    train_titles, held_titles = [titles[i] for i in order[:600]], [titles[i] for i in order[600:680]]
    users = [UserView(profile=f"User profile: {3 + k} purchases.", preference="",
                      history=(titles[rng.integers(len(titles))],)) for k in range(8)]

    wide = tmp_path / "wide"
    tiny.build_llava(wide, AutoTokenizer.from_pretrained(tiny_models["captioner"]),
                     replace(tiny.TinyModelSettings(), hidden_size=128, intermediate_size=352))
    base = LoadedModel(RunnerSettings(model=str(wide)))
    enc = PromptEncoder(base, max_length=512)
    pad = base.tokenizer.pad_token_id

    def encode(user, ts):
        return _encode(enc, user, [ItemView(f"Title: {t}", None) for t in ts])

    rows = []
    for k, user in enumerate(users):
        part = train_titles[k::len(users)]
        fitted, encoded = encode(user, part)
        rows += [make_row(fitted.ids, e, enc.answer_ids[YES if words(t) & chosen else NO])
                 for t, e in zip(part, encoded)]
    held = [encode(user, held_titles) for user in users[:2]]
    says_yes = np.array([bool(words(t) & chosen) for t in held_titles])
    assert 0.3 < says_yes.mean() < 0.7 and 0.4 < np.mean([r.ids[-r.answer_len] == enc.yes_id for r in rows]) < 0.6

    def held_out_auc(model) -> float:
        aucs = []
        for fitted, encoded in held:
            s = score_shared_prefix(model, fitted.ids, encoded, yes_id=enc.yes_id, no_id=enc.no_id, pad_id=pad,
                                    batch_size=32, device=base.device, dtype=base.dtype)
            yes, no = s[says_yes][:, None], s[~says_yes][None, :]
            aucs.append((yes > no).mean() + 0.5 * (yes == no).mean())
        return float(np.mean(aucs))

    _, result = train_lora(base.model, rows, held_out_auc,
                           RecommenderSettings(epochs=3, patience=0, learning_rate=2e-3),
                           pad_id=pad, device=base.device, dtype=base.dtype, work_dir=tmp_path / "w",
                           run_key="planted", log=lambda m: None)
    # The last epoch, not the best: the held-out set must not also pick the epoch it is judged on.
    assert result.base_valid_auc < 0.7 and result.history[-1]["valid_auc"] > 0.85, (result.base_valid_auc,
                                                                                    result.history)


# --- the promotion gate -----------------------------------------------------------------------------------

def test_promotion_gate_decisions():
    from srec.recommender.promotion import decide

    first = decide({"lora:a": 0.55}, "v1", None, None, 0.0)
    assert first.promoted and first.current_version is None and "first adapter" in first.reason
    better = decide({"lora:a": 0.56, "lora:b": 0.50}, "v2", {"lora:a": 0.55, "lora:b": 0.50}, "v1", 0.0)
    assert better.promoted and all(r.passed for r in better.rows)
    within = decide({"lora:a": 0.545}, "v2", {"lora:a": 0.55}, "v1", 0.01)
    assert within.promoted and abs(within.rows[0].delta + 0.005) < 1e-12
    worse = decide({"lora:a": 0.56, "lora:b": 0.48}, "v2", {"lora:a": 0.55, "lora:b": 0.50}, "v1", 0.01)
    assert not worse.promoted and [r.passed for r in worse.rows] == [True, False]
    assert "kept v1" in worse.reason and "lora:b by 0.0200" in worse.reason
    new_variant = decide({"lora:c": 0.40}, "v2", {"lora:a": 0.55}, "v1", 0.0)
    assert new_variant.promoted and "no variant in common" in new_variant.reason
    # An adapter of another base cannot serve this one: replaced, whatever its own figures were.
    other_base = decide({"lora:a": 0.40}, "v2", None, "v1", 0.0, current_unusable="was trained on base fingerprint x")
    assert other_base.promoted and "promoted over v1, which was trained on base fingerprint x" in other_base.reason
    assert [r.current_valid_auc for r in other_base.rows] == [None]
    # A rerun that reused its training runs stores the current version again: said so, not "first adapter".
    same = decide({"lora:a": 0.55}, "v1", None, "v1", 0.0)
    assert same.promoted and same.reason == "same content version as the current adapter"
    assert same.current_version == "v1" and [r.current_valid_auc for r in same.rows] == [0.55]
    with pytest.raises(ValueError, match="margin"):
        decide({"lora:a": 0.5}, "v2", None, None, -0.1)


def test_store_moves_current_only_when_promoted(tmp_path):
    from srec.recommender import artifacts

    def stored(name: str, promoted: bool | None, reason: str = "test"):
        folder = tmp_path / f"staging-{name}"
        (folder / "lora__a").mkdir(parents=True)
        (folder / "lora__a" / "adapter_model.safetensors").write_bytes(name.encode())
        manifest = {"category": "c", "variants": {"lora:a": {"folder": "lora__a", "best_valid_auc": 0.5}}}
        if promoted is not None:
            manifest["promotion"] = {"promoted": promoted, "reason": reason}
        return artifacts.store(artifacts.stage(folder, manifest), tmp_path / "root", "c", run_id=name)

    assert artifacts.load_current(tmp_path / "root", "c") is None
    first = stored("one", None)            # no decision recorded: promoted (sets from before the gate)
    kept = stored("two", False)
    assert artifacts.pointer(tmp_path / "root", "c", "latest")["version"] == kept.version
    assert artifacts.load_current(tmp_path / "root", "c").version == first.version
    third = stored("three", True)
    current = artifacts.pointer(tmp_path / "root", "c", "current")
    assert current["version"] == third.version and current["decision"]["promoted"] is True
    assert artifacts.load(tmp_path / "root", "c", kept.version).manifest["promotion"]["promoted"] is False
    # The same version again (a rerun that reused its training): the files stay in place (a scoring run may
    # have them open), the manifest and the pointers are this run's.
    weights = third.folder / "lora__a" / "adapter_model.safetensors"
    inode = weights.stat().st_ino
    again = stored("three", True, "same content version as the current adapter")
    assert again.version == third.version and weights.stat().st_ino == inode
    assert artifacts.pointer(tmp_path / "root", "c", "current")["run_id"] == "three"
    assert not (tmp_path / "staging-three").exists()
    assert artifacts.load(tmp_path / "root", "c", third.version).manifest["promotion"]["reason"].startswith("same")


def test_adapter_version_is_its_content_not_where_the_base_lies(tmp_path):
    """PEFT's config names the base's path and lists target_modules from a set (another order in another
    process); neither changes what the adapter is, and its model card is not hashed. Weights and lineage do."""
    import json

    from srec.recommender import artifacts

    def version(base: str, modules: list[str], weights: bytes = b"w", card: str = "", fingerprint: str = "f1"):
        folder = tmp_path / f"set-{len(list(tmp_path.iterdir()))}" / "lora__a"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        (folder / "adapter_config.json").write_text(json.dumps(
            {"base_model_name_or_path": base, "target_modules": modules, "r": 16}))
        (folder / "README.md").write_text(f"---\nbase_model: {base}\n---\n{card}")
        return artifacts.content_version(folder.parent, {"category": "c", "base_fingerprint": fingerprint,
                                                         "base_model": base})

    v = version("/work/a/tiny", ["q_proj", "v_proj", "up_proj"])
    assert version("/tmp/moved/tiny", ["up_proj", "q_proj", "v_proj"], card="other card") == v
    assert version("/work/a/tiny", ["q_proj", "v_proj"]) != v                       # other modules
    assert version("/work/a/tiny", ["q_proj", "v_proj", "up_proj"], weights=b"x") != v
    assert version("/work/a/tiny", ["q_proj", "v_proj", "up_proj"], fingerprint="f2") != v


def test_batches_are_planned_by_length_to_save_padding():
    from srec.recommender.scoring import plan_batches

    rng = np.random.default_rng(3)
    lengths = rng.integers(140, 310, 21).tolist()
    batches = plan_batches(lengths, max_batch=21)
    assert sorted(i for b in batches for i in b) == list(range(21))          # every candidate exactly once
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 21 * max(lengths)                                        # less than one padded batch
    assert all(len(b) <= 8 for b in plan_batches(lengths, max_batch=8))
    assert plan_batches([100] * 21, max_batch=32) == [list(range(21))]       # equal lengths: one call
    assert plan_batches([], max_batch=4) == []


def test_scoring_key_follows_every_input_of_the_scores_but_not_the_batch_size():
    """What recommender_scores reuses stored scores by: any change to the inputs' hashes, the base's fingerprint or
    numerics, the device type, the adapter files, the prompt settings, the protocols or the variant gives another
    key; the candidate batch size (padding only) and the device index do not."""
    from types import SimpleNamespace

    from srec.recommender.pipeline import scoring_key

    def base_model(fingerprint="f1", dtype="float32", device="cpu"):
        return SimpleNamespace(fingerprint=fingerprint, device=device,
                               identity=SimpleNamespace(generation=(("dtype", dtype), ("quantization", "none"))))

    inputs = {"eval_candidates": "a", "caption_snapshot": "c", "preference_snapshot": "p"}
    variant, settings = Variant.parse("lora:fused+recurrent"), RecommenderSettings()

    def key(inputs=inputs, variant=variant, loaded=base_model(), settings=settings, model_name="m", adapter="h1"):
        return scoring_key(inputs, variant, loaded, settings, model_name=model_name, adapter=adapter)

    base = key()
    assert key() == base
    assert key(settings=RecommenderSettings(score_batch_size=4)) == base
    assert key(loaded=base_model(device="cuda:0")) == key(loaded=base_model(device="cuda:1")) != base
    changed = {
        "captions": key(inputs={**inputs, "caption_snapshot": "c2"}),
        "candidates": key(inputs={**inputs, "eval_candidates": "a2"}),
        "base": key(loaded=base_model(fingerprint="f2")), "bf16": key(loaded=base_model(dtype="bfloat16")),
        "adapter": key(adapter="h2"), "zero-shot": key(adapter=None), "name": key(model_name="m2"),
        "history": key(settings=RecommenderSettings(history_items=5)),
        "protocols": key(settings=RecommenderSettings(protocols=("1+20", "1+99"))),
        "variant": key(variant=Variant.parse("lora:fused+none")),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed


def test_sft_input_key_follows_what_the_rows_depend_on():
    """sft_examples keeps its rows by this key: any input hash, example setting, the seed, the trained styles, the
    base's name or files change it; the base's numerics and device only where a chain-of-thought style has the
    base generate its reasoning; the scoring-only settings never."""
    from types import SimpleNamespace

    from srec.recommender.pipeline import sft_input_key

    def base(model="m", fingerprint="f1", dtype="float32", device="cpu"):
        identity = SimpleNamespace(generation=(("dtype", dtype), ("quantization", None)))
        return SimpleNamespace(settings=SimpleNamespace(model=model), fingerprint=fingerprint, identity=identity,
                               device=device)

    inputs = {"interactions": "i1", "caption_snapshot": "c1"}
    plain = RecommenderSettings(variants=("lora:fused+recurrent",))
    cot = RecommenderSettings(variants=("lora:fused+recurrent+cot",))
    key = sft_input_key(inputs, plain, 7, base())
    changed = [sft_input_key({**inputs, "caption_snapshot": "c2"}, plain, 7, base()),
               sft_input_key(inputs, RecommenderSettings(variants=plain.variants, history_items=3), 7, base()),
               sft_input_key(inputs, RecommenderSettings(variants=plain.variants, negatives_per_positive=2), 7, base()),
               sft_input_key(inputs, plain, 8, base()),
               sft_input_key(inputs, RecommenderSettings(variants=("lora:text+none",)), 7, base()),
               sft_input_key(inputs, cot, 7, base()),
               sft_input_key(inputs, plain, 7, base(model="elsewhere")),
               sft_input_key(inputs, plain, 7, base(fingerprint="f2"))]
    assert key not in changed and len(set(changed)) == len(changed)
    # zero-shot rows are not built; scoring settings and a GPU do not change what a plain style's rows are
    same = [sft_input_key(inputs, RecommenderSettings(variants=(*plain.variants, "zero-shot:text+none")), 7, base()),
            sft_input_key(inputs, RecommenderSettings(variants=plain.variants, score_batch_size=3), 7, base()),
            sft_input_key(inputs, plain, 7, base(dtype="bfloat16", device="cuda:0"))]
    assert set(same) == {key}
    cot_key = sft_input_key(inputs, cot, 7, base())
    assert cot_key != sft_input_key(inputs, cot, 7, base(dtype="bfloat16"))
    assert cot_key != sft_input_key(inputs, cot, 7, base(device="cuda:0"))


def test_validation_key_follows_what_validation_reads_but_not_training_settings():
    from types import SimpleNamespace

    from srec.recommender.pipeline import validation_key

    def base(fingerprint="f1", dtype="float32", device="cpu"):
        return SimpleNamespace(fingerprint=fingerprint, device=device,
                               identity=SimpleNamespace(generation=(("dtype", dtype), ("quantization", None))))

    inputs, v = {"interactions": "i1", "item_images": "m1"}, Variant.parse("lora:fused+recurrent")
    s = RecommenderSettings()
    key = validation_key(inputs, v, base(), s, 7)
    changed = [validation_key({**inputs, "item_images": "m2"}, v, base(), s, 7),
               validation_key(inputs, Variant.parse("lora:text+recurrent"), base(), s, 7),
               validation_key(inputs, v, base(fingerprint="f2"), s, 7),
               validation_key(inputs, v, base(dtype="bfloat16"), s, 7),
               validation_key(inputs, v, base(device="cuda:0"), s, 7),
               validation_key(inputs, v, base(), RecommenderSettings(history_items=3), 7),
               validation_key(inputs, v, base(), RecommenderSettings(valid_users=5), 7),
               validation_key(inputs, v, base(), s, 8)]
    assert key not in changed and len(set(changed)) == len(changed)
    # how the adapter was trained is the adapter's, not the validation's
    assert key == validation_key(inputs, v, base(), RecommenderSettings(learning_rate=0.5, epochs=9), 7)
    # the device index is not the device type
    assert validation_key(inputs, v, base(device="cuda:0"), s, 7) == validation_key(inputs, v, base(device="cuda:1"),
                                                                                    s, 7)


def test_the_gate_takes_recorded_aucs_only_under_the_same_validation_key():
    from srec.recommender.pipeline import current_valid_aucs

    variants = {"lora:a": {"best_valid_auc": 0.61, "validation_key": "k"},
                "lora:b": {"best_valid_auc": 0.55, "validation_key": "old"},
                "lora:c": {"best_valid_auc": 0.58}}  # a manifest from before validation keys
    rescored, logged = [], []
    got = current_valid_aucs(variants, {"lora:a": "k", "lora:b": "k", "lora:c": "k"},
                             lambda name: rescored.append(name) or 0.5, log=logged.append)
    assert got == {"lora:a": 0.61, "lora:b": 0.5, "lora:c": 0.5} and rescored == ["lora:b", "lora:c"]
    assert "as recorded" in logged[0] and "other inputs or settings" in logged[1] and "predates" in logged[2]


def test_finished_run_is_reused_only_with_its_key_and_best_adapter(tmp_path):
    import json

    from srec.recommender.pipeline import FINISHED, finished_run
    from srec.recommender.training import TrainResult, best_adapter_dir

    work = tmp_path / "work"
    assert finished_run(work, "k1") is None  # nothing there
    best_adapter_dir(work).mkdir(parents=True)
    result = TrainResult(epochs_run=3, best_epoch=2, best_valid_auc=0.61, history=[{"epoch": e} for e in (1, 2, 3)],
                         seconds=12.5, resumed_from_epoch=1)
    (work / FINISHED).write_text(json.dumps({"run_key": "k1", "valid_users": 7, "result": result.as_dict(),
                                             "trained_run_id": "run-a", "trained_at": 1.7e9,
                                             "validation_key": "vk"}))
    assert finished_run(work, "k1") is None  # no best adapter (a checkpoint cleared by another run)
    (best_adapter_dir(work) / "adapter_model.safetensors").write_bytes(b"weights")
    finished = finished_run(work, "k1")
    done, users = finished.result, finished.valid_users
    assert users == 7 and done.best_epoch == 2 and done.best_valid_auc == 0.61 and len(done.history) == 3
    assert done.resumed_from_epoch == 3 and done.seconds == 0.0  # nothing trained in this call
    assert (finished.trained_run_id, finished.trained_at, finished.validation_key) == ("run-a", 1.7e9, "vk")
    # a file from before srec recorded the training run still counts, without one
    (work / FINISHED).write_text(json.dumps({"run_key": "k1", "valid_users": 7, "result": result.as_dict()}))
    assert finished_run(work, "k1").trained_run_id is None and finished_run(work, "k1").validation_key is None
    assert finished_run(work, "k2") is None  # another configuration or data
    (work / FINISHED).write_text("{not json")
    assert finished_run(work, "k1") is None
