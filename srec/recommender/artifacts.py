"""The trained adapters as files: one folder per ``lora_adapter`` materialization.

    <artifacts>/lora_adapter/<category>/<version>/
        manifest.json                  base model, data hashes, caption and preference snapshots, prompt
                                       versions, hyper-parameters, validation metrics, per variant
        <variant slug>/                PEFT format: adapter_config.json + adapter_model.safetensors
    <artifacts>/lora_adapter/<category>/latest.json    the version the last materialization wrote
    <artifacts>/lora_adapter/<category>/current.json   the version serving: the last one the promotion gate
                                                       accepted (manifest["promotion"]), with the decision

``version`` is a content hash of the adapter weights and the manifest's lineage fields, so the same
training inputs and result give the same folder, and anything different gets a new one; old versions
stay (the adapter a report came from can still be loaded).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest.json"
CURRENT = "current.json"


@dataclass(frozen=True)
class AdapterSet:
    folder: Path                 # the version folder (or a staging folder before it is stored)
    version: str
    manifest: dict

    def adapter_path(self, variant: str) -> Path:
        entry = self.manifest["variants"].get(variant)
        if entry is None:
            raise KeyError(f"no adapter for variant {variant!r} in {self.folder} "
                           f"(trained: {sorted(self.manifest['variants'])})")
        return self.folder / entry["folder"]


def _adapter_file_bytes(path: Path) -> bytes | None:
    """What of a saved adapter file is its content. PEFT's ``adapter_config.json`` names the base by its path and
    writes ``target_modules`` from a set, in an order that changes from process to process: both are left out or
    sorted (the base is in the lineage by its fingerprint). PEFT's model card (``README.md``) only repeats the
    config and the path, so it is not hashed."""
    if path.name == "README.md":
        return None
    if path.name == "adapter_config.json":
        config = json.loads(path.read_text())
        config.pop("base_model_name_or_path", None)
        for key in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
        return json.dumps(config, sort_keys=True).encode()
    return path.read_bytes()


def _hash_adapter_files(h, folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST and (content := _adapter_file_bytes(p)) is not None:
            h.update(f"{p.relative_to(folder).as_posix()}\x00".encode())
            h.update(hashlib.sha256(content).digest())


def adapter_files_hash(folder: Path) -> str:
    """Hash of one variant's adapter files (``_adapter_file_bytes``): the same weights and config, wherever they lie
    and whichever set holds them."""
    h = hashlib.sha256()
    _hash_adapter_files(h, Path(folder))
    return h.hexdigest()[:16]


def content_version(folder: Path, manifest: dict) -> str:
    """Hash of every adapter file (``_adapter_file_bytes``) plus the manifest's lineage fields (not its timings)."""
    h = hashlib.sha256()
    _hash_adapter_files(h, folder)
    # The base by its fingerprint, not its path: the same adapter trained in a moved checkout is the same version.
    lineage = {k: manifest.get(k) for k in ("category", "base_fingerprint", "data", "settings")}
    h.update(json.dumps(lineage, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def stage(folder: Path, manifest: dict) -> AdapterSet:
    """Finish a staging folder: write the manifest with its version."""
    version = content_version(folder, manifest)
    manifest = {**manifest, "version": version}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return AdapterSet(folder, version, manifest)


def store(staged: AdapterSet, root: Path, category: str, run_id: str | None = None) -> AdapterSet:
    """Move a staged set to ``root/<category>/<version>`` and point ``latest.json`` at it; ``current.json``
    too when the manifest's promotion decision promoted it (a manifest without one is promoted)."""
    dest = Path(root) / category / staged.version
    if dest.exists():
        # The same version is the same content (content_version), e.g. a rerun that reused its training runs:
        # keep the files a scoring run may be reading, take this run's manifest (its decision) atomically.
        tmp = dest / f"{MANIFEST}.tmp"
        shutil.copyfile(staged.folder / MANIFEST, tmp)
        tmp.replace(dest / MANIFEST)
        shutil.rmtree(staged.folder)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged.folder), dest)
    ref = {"version": staged.version, "path": str(dest), "run_id": run_id}
    _write_pointer(dest.parent / LATEST, ref)
    promotion = staged.manifest.get("promotion") or {"promoted": True}
    if promotion.get("promoted"):
        _write_pointer(dest.parent / CURRENT, ref | {"decision": promotion})
    return AdapterSet(dest, staged.version, staged.manifest)


def _write_pointer(path: Path, ref: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ref, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: a reader never sees half a pointer


def pointer(root: Path, category: str, which: str = "current") -> dict | None:
    """The ``current`` (serving) or ``latest`` (last written) pointer of a category, or None."""
    name = {"current": CURRENT, "latest": LATEST}[which]
    path = Path(root) / category / name
    return json.loads(path.read_text()) if path.is_file() else None


def load_current(root: Path, category: str) -> AdapterSet | None:
    """The category's serving adapter, or None before the first one is promoted."""
    p = pointer(root, category, "current")
    return load(root, category, p["version"]) if p else None


def load(root: Path, category: str, version: str | None = None, which: str = "latest") -> AdapterSet:
    """A stored version; without one, the version the ``latest`` or ``current`` pointer names."""
    base = Path(root) / category
    if version is None:
        p = pointer(root, category, which)
        if p is None:
            raise FileNotFoundError(f"no {which} lora_adapter for {category!r} under {base}: materialize lora_adapter")
        version = p["version"]
    folder = base / version
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: not a stored lora_adapter version")
    return AdapterSet(folder, version, json.loads(manifest_file.read_text()))
