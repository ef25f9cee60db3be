from pathlib import Path

import pytest

from srec.config import ConfigError, load_categories, load_category_file
from srec.paths import CATEGORIES_FILE


def test_shipped_config_declares_beauty_sample_that_exists():
    cats = load_categories(CATEGORIES_FILE, extra="")
    assert list(cats) == ["beauty"]
    beauty = cats["beauty"]
    assert beauty.format == "p5_sequences"
    assert beauty.reviews.is_file() and beauty.items.is_file()
    # The committed sample stays small (the issue asks for a few hundred KB at most).
    assert beauty.reviews.stat().st_size + beauty.items.stat().st_size < 400_000


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cats.yaml"
    p.write_text(text)
    return p


def test_relative_paths_resolve_against_the_file(tmp_path):
    p = _write(tmp_path, "categories:\n  toys:\n    format: amazon2018\n    reviews: raw/Toys.json.gz\n")
    cfg = load_category_file(p)["toys"]
    assert cfg.reviews == (tmp_path / "raw" / "Toys.json.gz").resolve()
    assert cfg.items is None
    assert cfg.filtering.user_k_core == 5 and cfg.filtering.positive_min_rating == 4


@pytest.mark.parametrize(
    "body, message",
    [
        ("categories:\n  x:\n    format: csv\n    reviews: a\n", "unknown format 'csv'"),
        ("categories:\n  x:\n    format: amazon2018\n", "'reviews'"),
        ("categories:\n  x:\n    format: amazon2018\n    reviews: a\n    filtering: {kcore: 3}\n", "unknown filtering"),
        ("categories:\n  x:\n    format: amazon2018\n    reviews: a\n    filtering: {user_k_core: 2}\n", "user_k_core"),
        ("categories: {}\n", "non-empty"),
        ("categories: [oops\n", "not valid YAML"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, body, message):
    p = _write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_category_file(p)
    assert message in str(err.value) and str(p) in str(err.value)


def test_extra_files_add_categories_and_refuse_redeclaration(tmp_path):
    extra = _write(tmp_path, "categories:\n  sci:\n    format: inter_item_json\n    reviews: a.json\n")
    cats = load_categories(CATEGORIES_FILE, extra=str(extra))
    assert set(cats) == {"beauty", "sci"}
    dup = tmp_path / "dup.yaml"
    dup.write_text("categories:\n  beauty:\n    format: amazon2018\n    reviews: a\n")
    with pytest.raises(ConfigError, match="already declared"):
        load_categories(CATEGORIES_FILE, extra=str(dup))


def test_bad_image_settings_name_the_file_and_category(tmp_path):
    from srec.config import ConfigError, load_category_file

    f = tmp_path / "c.yaml"
    f.write_text("categories:\n  toys:\n    format: p5_sequences\n    reviews: a.txt\n    images: {max_sid: 3}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: category 'toys': images: unknown images setting.*max_sid"):
        load_category_file(f)
