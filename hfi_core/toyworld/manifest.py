"""sha256 manifests of built worlds (no torch: ``hfi toyworld verify`` stays instant)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_manifest(root: Path, exclude: tuple[str, ...] = (".work", "manifest.json")) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX paths), skipping ``exclude``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in exclude:
            out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def verify_manifest(world: Path) -> list[str]:
    """Problems with a built world against its ``manifest.json``; empty when every file matches."""
    world = Path(world)
    manifest_path = world / "manifest.json"
    if not manifest_path.exists():
        return [f"{manifest_path}: missing; build the world with `hfi toyworld build`"]
    expected = json.loads(manifest_path.read_text())
    actual = file_manifest(world)
    problems = [f"{world / k}: missing (listed in manifest.json)" for k in sorted(set(expected) - set(actual))]
    problems += [f"{world / k}: not in manifest.json" for k in sorted(set(actual) - set(expected))]
    problems += [
        f"{world / k}: sha256 {actual[k][:12]}... but manifest.json says {expected[k][:12]}..."
        for k in sorted(set(expected) & set(actual))
        if expected[k] != actual[k]
    ]
    return problems
