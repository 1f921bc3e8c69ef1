"""Save and load the bank, router and stress state: safetensors files plus a JSON manifest.

A saved bank is a folder:

    manifest.json               format, versions, configs, shapes, sha256 of each file,
                                and content_sha256: the sha256 of the manifest itself
    bank-<sha12>.safetensors    '<layer>.lora_A' (n, r, in) and '<layer>.lora_B' (n, r, out)
    router-<sha12>.safetensors  the router's state dict

Tensor files are named by their content and written before the manifest, and every file
is written to a temporary name and renamed into place. A kill at any moment therefore
leaves either the old manifest with its old files or the new manifest with its new files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters.bank import ExpertBank
from adapters.router import Router
from adapters.snapshot import BankSnapshot, bank_tensors
from adapters.stress import StressController
from agents.errors import AdapterFileError
from agents.files import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "selfimprove-expert-bank"
# Version 2 added content_sha256. Version 1 manifests (no checksum) still load, with a
# warning, so banks saved before it keep resuming; the next save rewrites them as version 2.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
CHECKSUM_KEY = "content_sha256"
_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _versions() -> dict:
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the canonical JSON of every manifest field except the checksum itself."""
    content = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    # Round-trip first so int keys and tuples hash as they will read back from the file.
    canonical = json.dumps(json.loads(json.dumps(content)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _describe(bank: ExpertBank, router: Router) -> dict:
    return {
        "bank_config": bank.config.to_dict(),
        "router_config": router.config.to_dict(),
        "router_context_dim": router.context_dim,
        "layers": {name: {"lora_A": list(l.lora_A.shape), "lora_B": list(l.lora_B.shape)} for name, l in bank.layers.items()},
    }


def save_bank(
    directory: str | Path,
    bank: ExpertBank,
    router: Router,
    stress: StressController | None = None,
    extra: dict | None = None,
) -> dict:
    """Save bank + router (+ stress state) into directory; returns the manifest written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payloads = {
        "bank": save_safetensors({k: v.detach().contiguous().cpu() for k, v in bank_tensors(bank).items()}),
        "router": save_safetensors({k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()}),
    }
    files = {}
    for kind, data in payloads.items():
        digest = hashlib.sha256(data).hexdigest()
        name = f"{kind}-{digest[:12]}.safetensors"
        if not (directory / name).exists():
            atomic_write_bytes(directory / name, data)
        files[kind] = {"path": name, "sha256": digest, "bytes": len(data)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saved_at": time.time(),
        "versions": _versions(),
        **_describe(bank, router),
        "files": files,
        "stress": stress.state_dict() if stress is not None else None,
        "extra": extra or {},
    }
    # The tensor files carry digests; this covers the rest (configs, stress state), which
    # would otherwise load silently after a hand edit that is still valid JSON.
    manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    keep = {f["path"] for f in files.values()}
    for stale in directory.glob("*.safetensors"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise AdapterFileError(f"no saved bank at {directory}: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is corrupt: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise AdapterFileError(
            f"{path} has format_version {manifest.get('format_version')!r}; this version reads {list(READABLE_VERSIONS)}"
        )
    # Checked whenever present, so lowering format_version to 1 does not skip the check.
    if CHECKSUM_KEY in manifest:
        if manifest[CHECKSUM_KEY] != manifest_checksum(manifest):
            raise AdapterFileError(f"{path} was edited or is corrupt: its content does not match its checksum")
    elif manifest["format_version"] == FORMAT_VERSION:
        raise AdapterFileError(f"{path} is corrupt: its '{CHECKSUM_KEY}' is missing")
    else:
        log.warning("%s is a format_version 1 manifest without a checksum; loading it unchecked", path)
    for key in ("files", "bank_config", "router_config", "layers"):
        if not isinstance(manifest.get(key), dict):
            raise AdapterFileError(f"{path} is corrupt: '{key}' is missing or malformed")
    return manifest


def _read_checked(directory: Path, entry: dict, kind: str) -> dict[str, torch.Tensor]:
    try:
        path = directory / entry["path"]
        expected = entry["sha256"]
    except (KeyError, TypeError) as err:
        raise AdapterFileError(f"{directory / MANIFEST} is corrupt: bad '{kind}' file entry") from err
    if Path(entry["path"]).name != entry["path"]:
        raise AdapterFileError(f"{directory / MANIFEST} names a file outside the folder: {entry['path']!r}")
    if not path.is_file():
        raise AdapterFileError(f"saved bank file {path} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise AdapterFileError(f"saved bank file {path} is corrupt: sha256 does not match the manifest")
    try:
        return load_safetensors(data)
    except SafetensorError as err:
        raise AdapterFileError(f"saved bank file {path} is unreadable: {err}") from err


def load_bank(
    directory: str | Path,
    bank: ExpertBank,
    router: Router,
    stress: StressController | None = None,
) -> dict:
    """Load a saved bank into live bank/router (and stress), after checking it fits them exactly."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    live = _describe(bank, router)
    # Structure must match; init seeds and inference settings (temperature, mode) need not.
    checks = [(f"bank_config.{k}", manifest["bank_config"].get(k), live["bank_config"][k]) for k in ("n_experts", "rank", "alpha")]
    checks += [(f"router_config.{k}", manifest["router_config"].get(k), live["router_config"][k]) for k in ("hidden_dim", "memory_dim")]
    checks += [("router_context_dim", manifest.get("router_context_dim"), live["router_context_dim"])]
    checks += [("layers", manifest["layers"], live["layers"])]
    for key, saved, expected in checks:
        if saved != expected:
            shown = "" if key == "layers" else f" (saved {saved!r}, live {expected!r})"
            raise AdapterFileError(f"saved bank at {directory} does not match this model and config: '{key}' differs{shown}")
    bank_state = _read_checked(directory, manifest["files"].get("bank"), "bank")
    router_state = _read_checked(directory, manifest["files"].get("router"), "router")
    targets = bank_tensors(bank)
    # Check everything before changing anything, so a bad file leaves the live bank as it was.
    for saved, live_state, kind in ((bank_state, targets, "bank"), (router_state, router.state_dict(), "router")):
        if set(saved) != set(live_state):
            raise AdapterFileError(f"saved {kind} at {directory} has different tensors than the live {kind}")
        for key, live_tensor in live_state.items():
            if saved[key].shape != live_tensor.shape:
                raise AdapterFileError(
                    f"saved {kind} tensor {key} has shape {tuple(saved[key].shape)}, expected {tuple(live_tensor.shape)}"
                )
    with torch.no_grad():
        for key, live_tensor in targets.items():
            live_tensor.copy_(bank_state[key])
        router.load_state_dict(router_state)
    if stress is not None and manifest.get("stress") is not None:
        stress.load_state_dict(manifest["stress"])
    return manifest


class BankStore:
    """A run's bank folder, bound to the live parts it saves and restores: the bank, the router
    and (when there is one) the stress controller. The current state is in ``current/``, named
    snapshots in ``snapshots/``."""

    def __init__(self, root: str | Path, bank: ExpertBank, router: Router, stress: StressController | None = None):
        self.root = Path(root)
        self.current = self.root / "current"
        self.snapshot_root = self.root / "snapshots"
        self.bank, self.router, self.stress = bank, router, stress

    def save(self, extra: dict | None = None) -> dict:
        return save_bank(self.current, self.bank, self.router, self.stress, extra)

    def load(self) -> dict:
        return load_bank(self.current, self.bank, self.router, self.stress)

    def exists(self) -> bool:
        return (self.current / MANIFEST).is_file()

    def snapshot(self, name: str) -> Path:
        if not _SNAPSHOT_NAME.match(name):
            raise AdapterFileError(f"bad snapshot name {name!r}: use letters, digits, '.', '_' or '-'")
        path = self.snapshot_root / name
        save_bank(path, self.bank, self.router, self.stress, extra={"snapshot": name})
        return path

    def snapshots(self) -> list[str]:
        if not self.snapshot_root.is_dir():
            return []
        return sorted(p.name for p in self.snapshot_root.iterdir()
                      if not p.name.startswith(".") and (p / MANIFEST).is_file())

    def delete_snapshot(self, name: str) -> None:
        """Remove a snapshot: renamed away first, so a kill never leaves a half-deleted one that lists as present."""
        path = self.snapshot_root / name
        if not path.is_dir():
            return
        doomed = self.snapshot_root / f".deleting-{name}-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed)

    def rollback(self, name: str) -> dict:
        """Restore a named snapshot into the live parts and make it the current one on disk."""
        if name not in self.snapshots():
            raise AdapterFileError(f"no snapshot named {name!r} under {self.snapshot_root}; have {self.snapshots()}")
        manifest = load_bank(self.snapshot_root / name, self.bank, self.router, self.stress)
        self.save(extra={"rolled_back_to": name})
        return manifest


__all__ = ["BankSnapshot", "BankStore", "load_bank", "manifest_checksum", "read_manifest", "save_bank"]
