"""File IO manager for the trained adapters: ``lora_adapter`` is a folder of PEFT files, not a table."""
from __future__ import annotations

from pathlib import Path

import dagster as dg

from srec.paths import ARTIFACTS_DIR
from srec.recommender import artifacts


class AdapterIOManager(dg.ConfigurableIOManager):
    """Stores an asset's ``AdapterSet`` under ``<root>/<asset>/<category>/<version>/`` (``current.json`` follows
    the set's promotion decision) and loads the category's current set."""

    root: str = str(ARTIFACTS_DIR)

    def _base(self, context) -> Path:
        return Path(self.root).joinpath(*context.asset_key.path)

    def handle_output(self, context: dg.OutputContext, obj: artifacts.AdapterSet) -> None:
        if not isinstance(obj, artifacts.AdapterSet):
            raise TypeError(f"AdapterIOManager stores AdapterSet values, got {type(obj).__name__}")
        stored = artifacts.store(obj, self._base(context), context.partition_key, context.run_id)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(stored.folder))})

    def load_input(self, context: dg.InputContext) -> artifacts.AdapterSet:
        """The category's current (promoted, serving) adapter set; the latest one where none was promoted yet
        (sets stored before the promotion gate existed)."""
        base = self._base(context.upstream_output)
        which = "current" if artifacts.pointer(base, context.partition_key, "current") else "latest"
        return artifacts.load(base, context.partition_key, which=which)
