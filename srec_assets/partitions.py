"""Categories are partitions: one per entry of data/categories.yaml (plus SREC_CATEGORIES_EXTRA files)."""

import dagster as dg

from srec.config import CategoryConfig, load_categories

CATEGORIES: dict[str, CategoryConfig] = load_categories()
category_partitions = dg.StaticPartitionsDefinition(list(CATEGORIES))


def category_config(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> CategoryConfig:
    return CATEGORIES[context.partition_key]
