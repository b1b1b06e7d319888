"""The SBOM of the cpu image: CycloneDX 1.6, valid against the format's own JSON schema, and
listing exactly the files the image holds (path and SHA-256), each with its origin."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from fixtures.lab import PINNED_COMMIT

from pipeline.build.sbom import (
    InventoryEntry,
    cyclonedx,
    load_licences,
    read_inventory,
    sbom_files,
)
from pipeline.core.project import Project
from pipeline.records import BuildRecord

VALIDATOR = JsonStrictValidator(SchemaVersion.V1_6)
# What the engine puts into every container it creates (empty files, later bind mounts).
CONTAINER_FILES = (
    "/.dockerenv",
    "/dev/console",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
)


def entry(
    path: str,
    origin: str = "deb",
    package: str = "libc6",
    licence: str = "-",
    version: str = "2.41-12+deb13u5",
) -> InventoryEntry:
    return InventoryEntry(path, "ab" * 32, 10, origin, package, version, "arm64", licence)


def document(*entries: InventoryEntry) -> dict[str, object]:
    return cyclonedx(
        entries,
        image="r/x",
        version="0.1.0",
        platform="linux/arm64",
        commit=PINNED_COMMIT,
        created="2026-10-01T02:11:48Z",
    )


def test_licences_become_spdx_expressions_the_schema_accepts() -> None:
    doc = document(
        entry("/lib/libc.so.6", licence="LGPL-2.1+"),
        entry("/lib/libzstd.so.1", package="libzstd1", licence="BSD-3-clause or GPL-2"),
        entry("/lib/libstdc++.so.6", package="libstdc++6-arm64-cross"),
        entry("/lib/libodd.so", package="libodd", licence="Odd-Licence"),
        entry("/app/llama-server", origin="llama.cpp", package="-", version="-"),
        entry("/etc/passwd", origin="project", package="-", version="-"),
    )
    by_name = {c["name"]: c for c in doc["components"]}  # type: ignore[attr-defined]
    assert by_name["libc6"]["licenses"] == [{"license": {"id": "LGPL-2.1-or-later"}}]
    assert by_name["libzstd1"]["licenses"] == [{"expression": "BSD-3-Clause OR GPL-2.0-only"}]
    assert by_name["libstdc++6-arm64-cross"]["licenses"] == [
        {"expression": "GPL-3.0-or-later WITH GCC-exception-3.1"}
    ]
    assert by_name["libodd"]["licenses"] == [{"license": {"name": "Odd-Licence"}}]
    assert by_name["llama.cpp"]["purl"] == f"pkg:github/ggml-org/llama.cpp@{PINNED_COMMIT}"
    assert by_name["libc6"]["purl"] == "pkg:deb/debian/libc6@2.41-12%2Bdeb13u5?arch=arm64"
    assert VALIDATOR.validate_str(json.dumps(doc)) is None
    # The same inventory gives the same document: serial number included.
    assert document(*reversed([entry("/a"), entry("/b")])) == document(entry("/a"), entry("/b"))


def test_a_broken_document_fails_the_schema() -> None:
    doc = document(entry("/lib/libc.so.6"))
    doc["components"][0]["licenses"] = [{"license": {"id": "Not-A-Licence"}}]  # type: ignore[index]
    assert VALIDATOR.validate_str(json.dumps(doc)) is not None


def test_every_licence_of_the_data_is_an_spdx_identifier() -> None:
    licences = load_licences()
    doc = document(
        *(entry(f"/p/{name}", package=name) for name in licences.packages),
        *(
            entry(f"/d/{short}", package=f"pkg-{i}", licence=short)
            for i, short in enumerate(licences.dep5)
        ),
    )
    assert VALIDATOR.validate_str(json.dumps(doc)) is None


def test_an_inventory_that_is_not_one_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "files.tsv"
    bad.write_text("/app/x\tnot enough fields\n")
    with pytest.raises(Exception, match="not an inventory line"):
        read_inventory(bad)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_cpu_images_sbom_lists_exactly_its_files(
    arch: str, cpu_image: Callable[[str], BuildRecord], lab_project: Project, tmp_path: Path
) -> None:
    from test_build import image_rootfs

    built = cpu_image(arch)
    assert built.sbom == f"sbom-cpu-{arch}.cdx.json"
    text = (lab_project.reports_dir / built.sbom).read_text()
    assert VALIDATOR.validate_str(text) is None
    doc = json.loads(text)
    listed = sbom_files(doc)
    rootfs = image_rootfs(built.ref, built.platform, tmp_path / "rootfs")
    held = {
        "/" + str(path.relative_to(rootfs)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in rootfs.rglob("*")
        if path.is_file() and not path.is_symlink()
    }
    for made_by_docker in CONTAINER_FILES:  # `docker export` adds them; the image has none
        held.pop(made_by_docker, None)
    assert listed == held  # every file, and nothing else, each with its own hash
    origins = {c["name"] for c in doc["components"]}
    assert {"llama.cpp", "libc6", "busybox-static", "ca-certificates"} <= origins
    assert all(c["licenses"] for c in doc["components"]), "a component without a licence"
    platform = {"name": "platform", "value": built.platform}
    assert platform in doc["metadata"]["component"]["properties"]
    print(f"\nFIGURE sbom cpu {arch}: {len(listed)} files in {len(doc['components'])} components")
