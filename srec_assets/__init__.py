"""The Dagster layer: assets, checks, partitions and Definitions. Logic lives in ``srec``."""
