"""The tiny offline models and the model runner: real transformers code paths, no network."""
import json
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from resources import ModelRunner

from srec.models.generation import GenerationRequest
from srec.models.runner import LoadedModel, ModelLoadError, ModelSpec, RunnerSettings, model_fingerprint
from srec.models.tiny import build_tiny_models
from srec.paths import SHARED_DATA_DIR
from tests.tiny_vlms import IDEFICS_FAMILIES, QWEN_VL_FAMILIES, tiny_vlm


@pytest.fixture(scope="module")
def red_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(path)
    return str(path)


def _titles(n: int) -> list[str]:
    lines = (SHARED_DATA_DIR / "amazon-beauty" / "item_titles.csv").read_text().splitlines()[1 : n + 1]
    return [line.split(",", 1)[1] for line in lines]


def test_tiny_models_are_real_architectures_and_deterministic(tmp_path):
    texts = _titles(400)
    a = build_tiny_models(texts, tmp_path / "a")
    b = build_tiny_models(texts, tmp_path / "b")
    for role in ("captioner", "summariser", "clip"):
        assert model_fingerprint(a[role]) == model_fingerprint(b[role]), role
    assert json.loads((a["captioner"] / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert json.loads((a["summariser"] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((a["clip"] / "config.json").read_text())["architectures"] == ["CLIPModel"]
    # A different corpus gives a different tokenizer, hence a different model.
    c = build_tiny_models(_titles(300), tmp_path / "c")
    assert model_fingerprint(c["summariser"]) != model_fingerprint(a["summariser"])
    # Rebuilding into the same folder with the same corpus reuses it.
    before = (a["captioner"] / "model.safetensors").stat().st_mtime_ns
    build_tiny_models(texts, tmp_path / "a")
    assert (a["captioner"] / "model.safetensors").stat().st_mtime_ns == before


def test_answer_words_are_single_tokens(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["summariser"], local_files_only=True)
    for word in ("Yes.", "No."):
        ids = tok.encode(word, add_special_tokens=False)
        assert tok.decode(ids) == word


def test_image_text_runner_batches_like_single_requests(tiny_models, red_image):
    m = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"]), max_new_tokens=8, max_batch_size=3))
    assert m.task == "image-text-to-text" and m.device == "cpu" and str(m.dtype) == "torch.float32"
    requests = [
        GenerationRequest("Title: red lipstick", red_image, system="Describe products."),
        GenerationRequest("Title: face cream for dry skin, 50 ml"),
        GenerationRequest("Title: shampoo", red_image),
        GenerationRequest("Title: a much longer title of a hair dryer with a diffuser and two speeds", red_image),
        GenerationRequest("Title: nail polish"),
    ]
    batched = m.generate(requests)
    single = [m.generate([r])[0] for r in requests]
    assert batched == single  # left padding + attention mask: batching does not change greedy outputs
    assert all(1 <= r.generated_tokens <= 8 for r in batched)
    # The chat template really carries the image token for image requests only.
    enc = m._encode(requests[:1])
    assert "pixel_values" in enc
    assert m.model.config.image_token_id in enc["input_ids"][0].tolist()
    assert "pixel_values" not in m._encode(requests[1:2])


@pytest.mark.parametrize("family", (*QWEN_VL_FAMILIES, *IDEFICS_FAMILIES, "gemma3"))
def test_other_image_text_families_caption_in_batches_like_single_requests(tiny_models, tmp_path, monkeypatch,
                                                                           family):
    """The captioner's code path on Qwen-VL (3-D rotary positions, flattened patches, image_grid_thw), Idefics3 /
    SmolVLM (image tiles, pixel_attention_mask) and Gemma 3 (token types, a sliding window): loaded from its folder
    by the runner, images of different shapes and a text-only prompt batch like single requests."""
    import transformers

    vlm = tiny_vlm(tiny_models["captioner"], family)
    vlm.model.save_pretrained(tmp_path / family)
    # Only the processor is handed over: the saved forms of several need torchvision (see tests/tiny_vlms.py).
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: vlm.processor)
    m = LoadedModel(RunnerSettings(model=str(tmp_path / family), max_new_tokens=8, max_batch_size=3))
    assert type(m.model) is type(vlm.model) and m.task == "image-text-to-text"
    paths = []
    for i, size in enumerate([(192, 80), (80, 120)]):
        paths.append(tmp_path / f"item{i}.png")
        Image.new("RGB", size, (90 * i, 40, 200)).save(paths[-1])
    requests = [GenerationRequest("Title: red lipstick", paths[0], system="Describe products."),
                GenerationRequest("Title: a much longer title of a hair dryer with a diffuser", paths[1],
                                  system="Describe products."),
                GenerationRequest("Title: nail polish", system="Describe products.")]
    batched = m.generate(requests)
    assert batched == [m.generate([r])[0] for r in requests]
    assert all(1 <= r.generated_tokens <= 8 for r in batched)
    images = m._encode(requests[:2])
    assert m.model.config.image_token_id in images["input_ids"][0].tolist()
    assert {"gemma3": "token_type_ids", **dict.fromkeys(QWEN_VL_FAMILIES, "image_grid_thw"),
            **dict.fromkeys(IDEFICS_FAMILIES, "pixel_attention_mask")}[family] in images


def test_causal_lm_runner(tiny_models, red_image):
    m = LoadedModel(RunnerSettings(model=str(tiny_models["summariser"]), max_new_tokens=6))
    assert m.task == "causal-lm"
    out = m.generate([GenerationRequest("Summarise: lipstick, mascara", system="You summarise.")])
    assert len(out) == 1 and out[0].generated_tokens >= 1
    with pytest.raises(ValueError, match="cannot take an image"):
        m.generate([GenerationRequest("x", red_image)])
    assert m.identity.fingerprint == model_fingerprint(tiny_models["summariser"])
    assert dict(m.identity.generation)["max_new_tokens"] == 6


def test_identity_key_follows_the_files_and_numerics_not_the_path(tiny_models, tmp_path):
    """The cache key a caption or summary is stored under: the same files in a moved folder hit the cache;
    other numerics (a bf16 load writes other text than fp32) or generation settings miss it."""
    import shutil

    moved = tmp_path / "elsewhere" / "summariser"
    shutil.copytree(tiny_models["summariser"], moved)
    here = LoadedModel(RunnerSettings(model=str(tiny_models["summariser"]), max_new_tokens=6))
    there = LoadedModel(RunnerSettings(model=str(moved), max_new_tokens=6))
    assert here.identity.model != there.identity.model and here.identity.key == there.identity.key
    assert dict(here.identity.generation) | {"max_new_tokens": 6} == {
        "do_sample": False, "dtype": "float32", "max_new_tokens": 6, "min_new_tokens": 1, "quantization": "none"}
    bf16 = LoadedModel(RunnerSettings(model=str(moved), max_new_tokens=6, dtype="bfloat16"))
    longer = LoadedModel(RunnerSettings(model=str(moved), max_new_tokens=7))
    assert len({here.identity.key, bf16.identity.key, longer.identity.key}) == 3
    (moved / "extra.txt").write_text("changed files")
    assert LoadedModel(RunnerSettings(model=str(moved), max_new_tokens=6)).identity.key != here.identity.key


def test_model_spec_names_what_a_load_would_be_without_loading(tiny_models):
    """What stored scores and finished training runs are checked against before any weights are loaded."""
    for settings in (RunnerSettings(model=str(tiny_models["summariser"]), max_new_tokens=6),
                     RunnerSettings(model=str(tiny_models["captioner"]), dtype="bfloat16")):
        spec, loaded = ModelSpec.of(settings), LoadedModel(settings)
        assert spec.identity == loaded.identity and spec.fingerprint == loaded.fingerprint
        assert spec.describe() == {k: v for k, v in loaded.describe().items() if k not in ("parameters",
                                                                                          "load_seconds")}
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelSpec.of(RunnerSettings(model="/nonexistent/model"))


def test_model_that_is_not_available_offline_says_so():
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache.*does not download"):
        LoadedModel(RunnerSettings(model="llava-hf/llava-1.5-7b-hf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        LoadedModel(RunnerSettings(model="/nonexistent/model"))


def test_quantization_on_cpu_is_a_clear_error(tiny_models):
    for q in ("4bit", "8bit"):
        with pytest.raises(ModelLoadError, match="bitsandbytes, which needs CUDA"):
            LoadedModel(RunnerSettings(model=str(tiny_models["summariser"]), quantization=q, device="cpu"))
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        LoadedModel(RunnerSettings(model=str(tiny_models["summariser"]), device="cuda"))
    with pytest.raises(ModelLoadError, match="quantization"):
        RunnerSettings(model="x", quantization="2bit")


def test_clip_scorer(tiny_models, red_image):
    from srec.models.clip import ClipScorer, ClipSettings

    s = ClipScorer(ClipSettings(str(tiny_models["clip"])))
    scores = s.score([red_image] * 3, ["red lipstick", "word " * 500, ""])  # long text is truncated, not an error
    assert len(scores) == 3 and all(-1.0 <= x <= 1.0 for x in scores)
    assert s.score([red_image], ["red lipstick"]) == pytest.approx(scores[:1], abs=1e-5)  # padding: float noise only
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        s.score([red_image] * 2, ["x"])


def test_model_runner_resource_loads_once_per_step(tiny_models):
    calls = []

    @dg.asset
    def uses_model(summariser: ModelRunner) -> None:
        calls.append(id(summariser.loaded))
        calls.append(id(summariser.loaded))
        assert summariser.generate([GenerationRequest("hello")])[0].generated_tokens >= 1

    runner = ModelRunner(role="summariser", model=str(tiny_models["summariser"]), max_new_tokens=4)
    assert dg.materialize([uses_model], resources={"summariser": runner}).success
    assert len(set(calls)) == 1


def test_recommender_shares_one_base_per_numerics_and_releases_it_before_another(tiny_models, monkeypatch):
    """recommender_scores and the promotion gate take the base from ``shared_base``: one copy for every variant of
    the same numerics, the resource's ``loaded`` copy where the settings are the same, and never two at once."""
    import weakref

    import resources.models as resources_models

    runner = ModelRunner(role="recommender", model=str(tiny_models["captioner"]))
    first = runner.shared_base(quantization="none")
    assert runner.shared_base(quantization="none") is first and runner.shared_base() is first
    held = weakref.ref(first.model)
    del first
    alive_at_load = []
    monkeypatch.setattr(resources_models, "LoadedModel",
                        lambda settings: alive_at_load.append(held() is not None) or LoadedModel(settings))
    other = runner.shared_base(dtype="bfloat16")  # other numerics (on a GPU: QLoRA's 4-bit base)
    assert other.settings.dtype == "bfloat16" and alive_at_load == [False]  # released before the other loaded
    monkeypatch.undo()
    runner.release_shared_base()
    assert runner.shared_base() is runner.loaded  # either way round, one copy for the same settings
    other_runner = ModelRunner(role="recommender", model=str(tiny_models["captioner"]))
    assert other_runner.loaded is other_runner.shared_base()


def test_model_runner_rejects_unknown_role(tiny_models):
    @dg.asset
    def uses_model(summariser: ModelRunner) -> None: ...

    with pytest.raises(Exception, match="role"):
        dg.materialize([uses_model], resources={"summariser": ModelRunner(role="critic", model=str(tiny_models["summariser"]))})


def test_missing_default_tiny_models_are_built_on_first_use(tmp_path, monkeypatch):
    import srec.models.tiny as tiny

    monkeypatch.setattr(tiny, "TINY_MODELS_DIR", tmp_path / "models")
    built = []
    monkeypatch.setattr(tiny, "category_texts", lambda categories=None: built.append(1) or _titles(300))
    folder = tiny.ensure_tiny_models(out_dir=tmp_path / "models")["summariser"]
    assert (Path(folder) / "config.json").is_file() and built == [1]
    tiny.ensure_tiny_models(out_dir=tmp_path / "models")
    assert built == [1]
