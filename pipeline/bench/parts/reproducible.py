"""reproducible: our cpu amd64 image built twice from cold (no layer cache, fresh cache-mount
ids: a fresh ccache each) through the build stage's OCI exporter (what releases push,
timestamps rewritten to SOURCE_DATE_EPOCH), and the two platform manifest digests compared.
Where they differ, the layouts are compared down to the first differing file."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pipeline.bench.builds import build_record, salted_dockerfile
from pipeline.bench.core import Bench, BenchBuild, Measured
from pipeline.bench.report import Figure, Goal, Metric
from pipeline.oci.image import OciLayout

PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class Difference:
    """How two layouts of one platform image differ: nothing (same digest), the image config's
    fields, or the files of a layer (path -> what differs)."""

    digests: tuple[str, str]
    config_fields: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # (path, "content" | "mtime" | ...), sorted

    @property
    def identical(self) -> bool:
        return self.digests[0] == self.digests[1]

    def describe(self) -> str:
        if self.identical:
            return f"identical: {self.digests[0]}"
        if self.files:
            path, what = self.files[0]
            more = f" ({len(self.files)} files differ)" if len(self.files) > 1 else ""
            return f"first differing file: /{path} ({what}){more}"
        if self.config_fields:
            return f"same files, image config differs in {', '.join(self.config_fields)}"
        return "same files and config; the manifests differ (annotations, media types)"


def _members(layer: bytes) -> dict[str, tuple[Any, ...]]:
    """path -> (type, mode, uid, gid, mtime, link, content sha256) of a layer tarball."""
    found: dict[str, tuple[Any, ...]] = {}
    with tarfile.open(fileobj=BytesIO(layer), mode="r:*") as tar:
        for member in tar:
            content = ""
            if member.isfile():
                handle = tar.extractfile(member)
                content = hashlib.sha256(handle.read() if handle else b"").hexdigest()
            found[member.name.removeprefix("./").rstrip("/")] = (
                member.type,
                member.mode,
                member.uid,
                member.gid,
                member.mtime,
                member.linkname,
                content,
            )
    return found


FIELDS = ("type", "mode", "uid", "gid", "mtime", "link", "content")


def _file_differences(a: bytes, b: bytes) -> Iterator[tuple[str, str]]:
    ours, theirs = _members(a), _members(b)
    for path in sorted(ours.keys() | theirs.keys()):
        left, right = ours.get(path), theirs.get(path)
        if left is None or right is None:
            yield path, "only in the first" if right is None else "only in the second"
        elif left != right:
            yield path, "+".join(f for f, x, y in zip(FIELDS, left, right, strict=True) if x != y)


def compare_layouts(first: Path, second: Path, platform: str = PLATFORM) -> Difference:
    """The two OCI layouts' images for `platform`, compared config first, then layer by
    layer (the layers of the first differing position, file by file)."""
    with OciLayout(first) as a, OciLayout(second) as b:
        digests = (a.platform_digests()[platform], b.platform_digests()[platform])
        if digests[0] == digests[1]:
            return Difference(digests)
        manifests = [
            layout.manifest(descriptor)
            for layout, descriptor in (
                (a, _descriptor(a, digests[0])),
                (b, _descriptor(b, digests[1])),
            )
        ]
        configs = [
            json.loads(layout.blob(m.config.digest))
            for layout, m in zip((a, b), manifests, strict=True)
        ]
        fields = tuple(
            sorted(
                k
                for k in configs[0].keys() | configs[1].keys()
                if configs[0].get(k) != configs[1].get(k)
            )
        )
        files: list[tuple[str, str]] = []
        layers = [m.layers for m in manifests]
        for index in range(max(len(layers[0]), len(layers[1]))):
            left = layers[0][index] if index < len(layers[0]) else None
            right = layers[1][index] if index < len(layers[1]) else None
            if left and right and left.digest == right.digest:
                continue
            empty = _empty_tar()
            files += _file_differences(
                a.blob(left.digest) if left else empty, b.blob(right.digest) if right else empty
            )
        return Difference(digests, fields, tuple(files))


def _descriptor(layout: OciLayout, digest: str) -> Any:
    top = layout.top
    if top.digest == digest:
        return top
    return next(d for d in layout.manifest(top).descriptors if d.digest == digest)


def _empty_tar() -> bytes:
    buffer = BytesIO()
    with tarfile.open(fileobj=buffer, mode="w"):
        pass
    return buffer.getvalue()


def measure(bench: Bench) -> Measured:
    project, snapshot = bench.sync("ours", refresh=True)
    out = bench.work / "reproducible"
    out.mkdir(parents=True, exist_ok=True)
    layouts: list[Path] = []
    seconds: list[float] = []
    for n in (1, 2):
        salt = f"repro-{bench.run_id}-{n}"
        layout = out / f"cpu-amd64-{n}.tar"
        layout.unlink(missing_ok=True)
        salted = salted_dockerfile(project, salt)
        tag = bench.tag("ours", f"repro-{n}")
        request = BenchBuild(project, PLATFORM, tag, salted, True, oci_path=layout)
        record = build_record(bench, f"reproducible-cold-{n}", request, snapshot)
        layouts.append(layout)
        seconds.append(record.seconds)
    difference = compare_layouts(layouts[0], layouts[1])
    differing = 0 if difference.identical else max(1, len(difference.files))
    metric = Metric(
        "reproducible.files",
        "two cold builds, cpu amd64: files that differ",
        "files",
        Figure.of(differing, note=difference.describe()),
        Figure.missing("no reference: the goal is identical digests"),
        other_label="-",
        goal=Goal("<=", 0),
    )
    notes = (
        f"reproducible: {difference.describe()}; digests {difference.digests[0]} and "
        f"{difference.digests[1]}; cold builds {seconds[0]:.0f} s and {seconds[1]:.0f} s "
        "(no layer cache, fresh ccache each, the release's OCI exporter with rewrite-timestamp)",
    )
    details = {
        "digests": list(difference.digests),
        "identical": difference.identical,
        "config_fields": list(difference.config_fields),
        "files": [list(f) for f in difference.files[:50]],
        "seconds": seconds,
    }
    return Measured((metric,), notes, details)
