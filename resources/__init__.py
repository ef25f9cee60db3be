"""Dagster resources: they own storage (DuckDB, report folders) and, later, the models."""
from resources.storage import SrecStorage

__all__ = ["SrecStorage"]
