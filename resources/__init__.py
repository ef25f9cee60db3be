"""Dagster resources: storage (DuckDB, report and artifact folders) and the models (one runner per role)."""
from resources.artifacts import AdapterIOManager
from resources.models import DEFAULT_MODELS, HallucinationScorer, ModelRunner
from resources.storage import SrecStorage

__all__ = ["AdapterIOManager", "DEFAULT_MODELS", "HallucinationScorer", "ModelRunner", "SrecStorage"]
