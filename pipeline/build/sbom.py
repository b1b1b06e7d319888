"""The SBOM of an image assembled file by file: CycloneDX 1.6 from its build's inventory.

The cpu image's rootfs stage records every file it puts in the image and where it came from
(dockerfiles/image/inventory.sh: a Debian package and version, a PyPI wheel (NVIDIA's CUDA
libraries), llama.cpp at the pinned commit, or this project); nothing is guessed by a
scanner. Each package is a component holding its files (with their SHA-256), licences are SPDX
expressions (pipeline/build/licences.yaml fills in what the copyright files do not say). The same
inventory gives the same document, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.core.datafile import load_yaml, write_json_atomic
from pipeline.core.errors import BuildError
from pipeline.core.fields import Fields

LICENCES_FILE = Path(__file__).with_name("licences.yaml")
SPEC_VERSION = "1.6"
_FIELDS = ("path", "sha256", "size", "origin", "package", "version", "arch", "licence")


@dataclass(frozen=True)
class InventoryEntry:
    """One file of the image and where it came from (`-` for what does not apply)."""

    path: str
    sha256: str
    size: int
    origin: str  # deb | pypi | llama.cpp | project
    package: str
    version: str
    arch: str
    licence: str


@dataclass(frozen=True)
class Licences:
    dep5: Mapping[str, str]
    packages: Mapping[str, str]
    origins: Mapping[str, str]


def load_licences(path: Path = LICENCES_FILE) -> Licences:
    top = Fields(load_yaml(path), path.name, ("dep5", "packages", "origins"))
    return Licences(top.string_map("dep5"), top.string_map("packages"), top.string_map("origins"))


def read_inventory(path: Path) -> list[InventoryEntry]:
    """The tab-separated inventory the rootfs stage wrote (BuildError when it is not one)."""
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BuildError(f"the build exported no inventory {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        values = line.split("\t")
        if len(values) != len(_FIELDS) or not values[2].isdigit():
            raise BuildError(f"{path}:{number}: not an inventory line: {line!r}")
        fields = dict(zip(_FIELDS, values, strict=True))
        entries.append(InventoryEntry(**{**fields, "size": int(values[2])}))  # type: ignore[arg-type]
    if not entries:
        raise BuildError(f"{path} lists no files")
    return entries


def _licence(entry: InventoryEntry, licences: Licences) -> str | None:
    """The SPDX expression of an entry's licence, or None when nothing says it."""
    if entry.origin == "pypi":  # the wheel's own License-Expression
        return entry.licence if entry.licence != "-" else None
    if entry.origin != "deb":
        return licences.origins.get(entry.origin)
    if entry.package in licences.packages:
        return licences.packages[entry.package]
    if entry.licence != "-":
        return _spdx_expression(entry.licence, licences.dep5)
    return None


def _spdx_expression(dep5: str, names: Mapping[str, str]) -> str:
    """A DEP-5 licence field (`BSD-3-clause or GPL-2`) as an SPDX expression, word by word."""
    operators = {"or": "OR", "and": "AND", "with": "WITH"}
    words = [operators.get(w.lower(), names.get(w, w)) for w in dep5.replace(",", " ").split()]
    return " ".join(words)


def _licences_field(expression: str | None, known: Iterable[str]) -> list[dict[str, Any]]:
    if expression is None:
        return []
    if " " in expression or expression.startswith("LicenseRef-"):  # an SPDX expression
        return [{"expression": expression}]
    if expression in known:  # an SPDX identifier the data vouches for
        return [{"license": {"id": expression}}]
    return [{"license": {"name": expression}}]  # a copyright file's own short name


def _purl(entry: InventoryEntry, commit: str) -> str:
    if entry.origin == "deb":
        version = quote(entry.version, safe="")
        return f"pkg:deb/debian/{entry.package}@{version}?arch={entry.arch}"
    if entry.origin == "pypi":
        return f"pkg:pypi/{entry.package}@{quote(entry.version, safe='')}"
    if entry.origin == "llama.cpp":
        return f"pkg:github/ggml-org/llama.cpp@{commit}"
    return "pkg:github/llamacpp-images/llama-server-images"


def cyclonedx(
    entries: Iterable[InventoryEntry],
    *,
    image: str,
    version: str,
    platform: str,
    commit: str,
    created: str,
    licences: Licences | None = None,
) -> dict[str, Any]:
    """The CycloneDX 1.6 document of one platform's image."""
    licences = licences or load_licences()
    known = {*licences.dep5.values(), *licences.packages.values(), *licences.origins.values()}
    entries = sorted(entries, key=lambda e: e.path)
    components: dict[str, dict[str, Any]] = {}
    for entry in entries:
        purl = _purl(entry, commit)
        if purl not in components:
            packaged = entry.origin in ("deb", "pypi")
            name = entry.package if packaged else entry.origin
            if entry.origin == "project":
                name = "llama-server-images"
            components[purl] = {
                "type": "library" if packaged else "application",
                "bom-ref": purl,
                "name": name,
                "version": entry.version
                if packaged
                else (commit if entry.origin == "llama.cpp" else version),
                "purl": purl,
                "licenses": _licences_field(_licence(entry, licences), known),
                "components": [],
            }
        components[purl]["components"].append(
            {
                "type": "file",
                "bom-ref": f"file:{entry.path}",
                "name": entry.path,
                "hashes": [{"alg": "SHA-256", "content": entry.sha256}],
                "properties": [{"name": "size", "value": str(entry.size)}],
            }
        )
    digest = hashlib.sha256(
        json.dumps([platform, image, version, commit, list(components.values())]).encode()
    )
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, digest.hexdigest())}",
        "version": 1,
        "metadata": {
            "timestamp": created,
            "tools": {
                "components": [
                    {"type": "application", "name": "llama-server-images", "version": version}
                ]
            },
            "component": {
                "type": "container",
                "bom-ref": "image",
                "name": image,
                "version": version,
                "properties": [
                    {"name": "platform", "value": platform},
                    {"name": "org.opencontainers.image.revision", "value": commit},
                ],
            },
        },
        "components": list(components.values()),
        "dependencies": [{"ref": "image", "dependsOn": sorted(components)}],
    }


def sbom_files(document: Mapping[str, Any]) -> dict[str, str]:
    """path -> SHA-256 of every file a document lists (what an image must hold exactly)."""
    return {
        file["name"]: file["hashes"][0]["content"]
        for component in document.get("components", [])
        for file in component.get("components", [])
    }


def write_sbom(path: Path, document: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, document)
    path.chmod(0o644)
    return path
