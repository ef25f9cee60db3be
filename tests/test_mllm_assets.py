"""The MLLM assets through Dagster on a category with real item text and image files (some broken)."""
import io
import json

import dagster as dg
import duckdb
import pytest
from PIL import Image

import srec_assets.partitions as partitions
from srec.config import CategoryConfig, FilterSettings
from srec.paths import SHARED_DATA_DIR
from srec_assets.assets.ingest import raw_items, raw_reviews
from srec_assets.assets.mllm import item_captions, item_images, user_preferences
from srec_assets.assets.sequences import interactions
from srec_assets.checks import ALL_CHECKS

ASSETS = [raw_reviews, raw_items, interactions, item_images, item_captions, user_preferences]
NAMES = {a.key.path[0] for a in ASSETS}
CHECKS = [c for c in ALL_CHECKS if all(k.asset_key.path[0] in NAMES for k in c.check_keys)]


@pytest.fixture
def scientific_with_images(tmp_path, monkeypatch):
    """25 real Scientific users and their items' real text, with image files: one truncated, one absent,
    one only at a URL nobody answers; served to the assets as the 'beauty' partition."""
    inter = json.loads((SHARED_DATA_DIR / "amazon-scientific" / "Scientific.inter.json").read_text())
    meta = json.loads((SHARED_DATA_DIR / "amazon-scientific" / "Scientific.item.json").read_text())
    users = dict(list(inter.items())[:25])
    items = sorted({str(i) for seq in users.values() for i in seq}, key=int)
    (tmp_path / "images").mkdir()
    item_meta = {}
    for n, item in enumerate(items):
        m = dict(meta[item])
        if n == 0:
            m["image_path"] = "images/missing.jpg"
        elif n == 1:
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG")
            (tmp_path / "images" / "truncated.jpg").write_bytes(buf.getvalue()[:300])
            m["image_path"] = "images/truncated.jpg"
        elif n == 2:
            m["image_url"] = "http://127.0.0.1:9/nothing-listens-here.jpg"
        else:
            mode = ("RGB", "RGBA", "CMYK", "P")[n % 4]
            Image.new(mode, (80 + n, 60), tuple([n % 255] * len(mode)) if mode != "P" else n % 255).save(
                tmp_path / "images" / f"{item}.{'jpg' if mode == 'CMYK' else 'png'}")
            m["image_path"] = f"images/{item}.{'jpg' if mode == 'CMYK' else 'png'}"
        item_meta[item] = m
    (tmp_path / "inter.json").write_text(json.dumps(users))
    (tmp_path / "items.json").write_text(json.dumps(item_meta))
    cfg = CategoryConfig(
        name="beauty", format="inter_item_json", reviews=tmp_path / "inter.json", items=tmp_path / "items.json",
        filtering=FilterSettings(user_k_core=3, item_k_core=1),
        images={"download_timeout_s": 0.5, "download_retries": 0},
    )
    monkeypatch.setitem(partitions.CATEGORIES, "beauty", cfg)
    return items


def _checks(result) -> dict[str, bool]:
    return {e.event_specific_data.check_name: e.event_specific_data.passed for e in result.all_events
            if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION}


def test_broken_images_take_the_text_path_and_rematerializing_captions_nothing(
        scientific_with_images, storage, model_resources):
    items = scientific_with_images
    resources = {"storage": storage, **model_resources}
    with dg.instance_for_test() as instance:
        result = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                                run_config={"ops": {"user_preferences": {"config": {"modes": ["recurrent", "direct"]}}}})
        assert result.success
        checks = _checks(result)
        assert all(v for k, v in checks.items() if k != "caption_hallucination"), checks

        con = duckdb.connect(storage.database, read_only=True)
        rows = {r[0]: r[1:] for r in con.execute(
            "SELECT i.item_id, i.status, i.reason, c.modality, c.status, i.synthetic FROM item_images i "
            "JOIN item_captions c USING (category, item_id)").fetchall()}
        assert rows[items[0]][:1] == ("missing",) and "file not found" in rows[items[0]][1]
        assert rows[items[1]][:1] == ("invalid",) and "truncated" in rows[items[1]][1]
        assert rows[items[2]][0] == "missing" and "download failed" in rows[items[2]][1]
        for item in items[:3]:
            assert rows[item][2:4] == ("text", "ok")  # no usable image: the text-only prompt, still a caption
        assert all(r[2] == "image+text" and r[3] == "ok" and not r[4] for i, r in rows.items() if i not in items[:3])
        n_users = con.execute("SELECT count(DISTINCT user_id) FROM interactions").fetchall()[0][0]
        assert con.execute("SELECT count(*) FROM user_preferences").fetchall()[0][0] == n_users * 3 * 2  # train, valid and test targets x two modes
        con.close()
        md = result.asset_materializations_for_node("item_images")[0].metadata
        assert (md["missing"].value, md["invalid"].value, md["synthetic"].value) == (2, 1, 0)

        again = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                               selection=dg.AssetSelection.assets(item_captions, user_preferences),
                               run_config={"ops": {"user_preferences": {"config": {"modes": ["recurrent", "direct"]}}}})
        assert again.success
        cap = again.asset_materializations_for_node("item_captions")[0].metadata
        assert (cap["new"].value, cap["cached"].value) == (0, len(items))
        pref = again.asset_materializations_for_node("user_preferences")[0].metadata
        assert pref["generated"].value == 0
        # Same content -> same DataVersion, so nothing downstream looks stale.
        first_v = result.asset_materializations_for_node("item_captions")[0].tags["dagster/data_version"]
        assert again.asset_materializations_for_node("item_captions")[0].tags["dagster/data_version"] == first_v


def test_preference_modes_follow_the_recommender_variants():
    from dataclasses import replace

    from srec_assets.assets.mllm import preference_modes
    from srec_assets.partitions import CATEGORIES

    beauty = CATEGORIES["beauty"]   # lora:fused+recurrent and zero-shot: recurrent summaries only
    assert preference_modes(beauty, None) == ("recurrent",)
    ablation = replace(beauty, recommender={"variants": ["lora:fused+direct", "lora:text+none"]})
    assert preference_modes(ablation, None) == ("recurrent", "direct")
    assert preference_modes(ablation, ["direct"]) == ("direct",)
