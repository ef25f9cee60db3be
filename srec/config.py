"""Category configuration: one YAML file under data/ declares every category (= Dagster partition).

Extra files named in ``SREC_CATEGORIES_EXTRA`` (os.pathsep-separated) add categories without
editing the shipped file; benchmarks use that for the full shared datasets.
Relative paths in a file are resolved against that file's folder.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from srec.paths import CATEGORIES_FILE

FORMATS = (
    "amazon2014",        # reviews_*.json(.gz) JSON lines + meta_*.json(.gz) Python-literal lines
    "amazon2018",        # *.json(.gz) JSON lines + meta JSON lines
    "amazon2023",        # *.jsonl(.gz) JSON lines (timestamps in ms) + meta JSON lines
    "p5_sequences",      # user_sequence.txt ('USER ITEM ITEM ...') + item titles CSV
    "inter_item_json",   # {"user": [items...]} + {"item": {title, description, brand, categories}}
    "recbole_atomic",    # RecBole .inter + .item (tab-separated, typed header)
)


class ConfigError(ValueError):
    """A category config that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class FilterSettings:
    rating_min: float = 1.0            # ratings outside [rating_min, rating_max] are quarantined
    rating_max: float = 5.0
    positive_min_rating: float = 4.0   # MLLM-SRec: >= 4 positive
    negative_max_rating: float = 2.0   # <= 2 explicit negative; in between dropped
    user_k_core: int = 5
    item_k_core: int = 5
    max_history: int = 50              # longest history a model or prompt sees (most recent items)


@dataclass(frozen=True)
class CategoryConfig:
    name: str
    format: str
    reviews: Path                      # the interactions file
    items: Path | None                 # item metadata file (None: items known only by id)
    filtering: FilterSettings = field(default_factory=FilterSettings)
    seed: int = 2024                   # candidate sampling and model training
    description: str = ""
    # Per-category hyper-parameters of the classic baselines (fields of srec.baselines.BaselineSettings);
    # run config given at materialization overrides them.
    baselines: dict = field(default_factory=dict)
    # Image handling (fields of srec.images.ImageSettings): sizes, download limits, placeholders.
    images: dict = field(default_factory=dict)
    # The MLLM recommender (fields of srec.recommender.RecommenderSettings): variants, LoRA, optimisation.
    recommender: dict = field(default_factory=dict)
    # The scheduled retrain (srec_assets.automation) launches this category; false leaves it out.
    retrain: bool = True

    def as_dict(self) -> dict:
        d = asdict(self)
        d["reviews"] = str(self.reviews)
        d["items"] = str(self.items) if self.items else None
        return d


def _parse_category(name: str, raw: dict, base: Path, source: Path) -> CategoryConfig:
    where = f"{source}: category '{name}'"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if "reviews" not in raw:
        raise ConfigError(f"{where}: 'reviews' (path of the interactions file) is required")
    known = {f.name for f in fields(FilterSettings)}
    filt = raw.get("filtering") or {}
    unknown = set(filt) - known
    if unknown:
        raise ConfigError(f"{where}: unknown filtering settings {sorted(unknown)}; known: {sorted(known)}")
    settings = FilterSettings(**filt)
    if settings.user_k_core < 3:
        raise ConfigError(f"{where}: user_k_core must be >= 3 (leave-one-out needs train, valid and test items)")
    if settings.negative_max_rating >= settings.positive_min_rating:
        raise ConfigError(f"{where}: negative_max_rating must be below positive_min_rating")

    def resolve(p: str | None) -> Path | None:
        if p is None:
            return None
        path = Path(os.path.expandvars(str(p))).expanduser()
        return path if path.is_absolute() else (base / path).resolve()

    baselines = raw.get("baselines") or {}
    if not isinstance(baselines, dict):
        raise ConfigError(f"{where}: 'baselines' must be a mapping of BaselineSettings fields")
    images = raw.get("images") or {}
    if not isinstance(images, dict):
        raise ConfigError(f"{where}: 'images' must be a mapping of ImageSettings fields")
    from srec.images import ImageSettings  # noqa: PLC0415 (srec.images is heavier; only needed here)

    try:
        ImageSettings.from_mapping(images)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: images: {e}") from e
    recommender = raw.get("recommender") or {}
    if not isinstance(recommender, dict):
        raise ConfigError(f"{where}: 'recommender' must be a mapping of RecommenderSettings fields")
    from srec.recommender.settings import RecommenderSettings  # noqa: PLC0415

    try:
        RecommenderSettings.from_mapping(recommender)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: recommender: {e}") from e
    return CategoryConfig(
        recommender=dict(recommender),
        baselines=dict(baselines),
        images=dict(images),
        name=name,
        format=fmt,
        reviews=resolve(raw["reviews"]),
        items=resolve(raw.get("items")),
        filtering=settings,
        seed=int(raw.get("seed", 2024)),
        retrain=_bool(raw.get("retrain", True), f"{where}: retrain"),
        description=str(raw.get("description", "")),
    )


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def load_category_file(path: Path) -> dict[str, CategoryConfig]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read category config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"category config {path} is not valid YAML: {e}") from e
    cats = doc.get("categories")
    if not isinstance(cats, dict) or not cats:
        raise ConfigError(f"{path}: expected a non-empty 'categories:' mapping")
    return {name: _parse_category(name, raw, path.parent, path) for name, raw in cats.items()}


def load_categories(path: Path | None = None, extra: str | None = None) -> dict[str, CategoryConfig]:
    """The shipped categories plus those of every file in ``SREC_CATEGORIES_EXTRA``."""
    result = load_category_file(path or Path(os.environ.get("SREC_CATEGORIES", CATEGORIES_FILE)))
    extra = os.environ.get("SREC_CATEGORIES_EXTRA", "") if extra is None else extra
    for extra_file in filter(None, extra.split(os.pathsep)):
        for name, cfg in load_category_file(Path(extra_file)).items():
            if name in result:
                raise ConfigError(f"{extra_file}: category '{name}' is already declared")
            result[name] = cfg
    return result
