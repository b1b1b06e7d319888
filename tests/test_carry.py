"""Compiler results carried between machines (--ccache-to / --ccache-from): the export is the
cache mount as files, bounded; a build on an empty mount seeded from it compiles from cache;
a corrupt seed and a missing one still build, only slower."""

from __future__ import annotations

import random
import re
import secrets
from pathlib import Path

import pytest
from fixtures.lab import TEST_CPU_VARIANTS, build_lock, copy_project

from pipeline.build.options import BuildOptions
from pipeline.core.project import Project
from pipeline.oci.ccache import ccache_bytes, ccache_hits, replaced_directory
from pipeline.records import BuildRecord
from pipeline.records.snapshot import check_snapshot

LOG = """#18 10.61 Cacheable calls:   193 / 200 (96.5%)
#18 10.61   Hits:            150 / 193 (77.72%)
#18 10.61     Direct:        140 / 150 (93.33%)
#18 10.61   Misses:           43 / 193 (22.28%)
#18 10.61 Local storage:
#18 10.61   Cache size (GB): 0.1 / 2.0 ( 4.61%)
#18 10.61   Hits:            150 / 193 (77.72%)
"""


def test_the_hit_rate_is_read_from_the_build_log() -> None:
    assert ccache_hits(LOG) == (150, 193)
    # Two compile steps (libraries, then the server): their reports add up.
    assert ccache_hits(LOG + LOG.replace("150", "193")) == (343, 386)
    # Small counts are padded: "0 /   5".
    padded = (
        "#19 22.45 Cacheable calls:     5 /   5 (100.0%)\n#19 22.45   Hits:   2 /   5 (40.00%)\n"
    )
    assert ccache_hits(padded) == (2, 5)
    # Another step's line between a report's lines (BuildKit interleaves parallel steps).
    between = padded.replace(
        "\n#19 22.45   Hits", "\n#17 30.1 Hits: 9 / 9 in npm\n#19 22.45   Hits"
    )
    assert ccache_hits(between) == (2, 5)
    assert ccache_hits("no stats here") is None


def test_an_export_replaces_the_old_directory_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "ccache" / "cpu-amd64"
    target.mkdir(parents=True)
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), replaced_directory(target) as staging:
        (staging / "half").write_text("half")
        raise RuntimeError("export failed")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in target.parent.iterdir()] == ["cpu-amd64"]
    with replaced_directory(target) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert ccache_bytes(target) == 3


def own_ccache_mount(project: Project, salt: str) -> Path:
    """The cpu Dockerfile with its ccache mount renamed: a mount nothing has filled, as on a
    fresh runner (the other cache mounts stay warm). A mount's id is not part of BuildKit's
    cache key: the builds below also rebuild the builder stage (--no-cache-filter)."""
    text = project.rendered_dockerfile("cpu").read_text()
    salted, count = re.subn(
        r"id=ccache-cpu-\$TARGETARCH\b", f"id=ccache-cpu-$TARGETARCH-{salt}", text
    )
    assert count == 3  # the compile's two steps and the export
    path = project.build_dir / f"cpu-{salt}.Dockerfile"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(salted)
    return path


def carry_project(lab_project: Project, root: Path) -> Project:
    """A project of the test's own on the lab's snapshot: its reports, logs and image tag are
    not the session's (the other tests smoke the session's cpu image by its report)."""
    copy_project(root)
    (root / "third_party").symlink_to(lab_project.third_party.parent)
    return Project(root)


def build_cpu(project: Project, **options: object) -> BuildRecord:
    from pipeline.build import build

    with build_lock():
        (record,) = build(
            BuildOptions.named(
                project,
                platforms=("linux/amd64",),
                backends=("cpu",),
                # The session's kernel set: its compile is in the shared mount already, so the
                # first build below is all hits; the seeded ones start from an empty mount.
                cpu_variants=TEST_CPU_VARIANTS,
                tags=("carry-test/llama-server:carry",),
                quiet=True,
                **options,  # type: ignore[arg-type]
            ),
            check_snapshot(project),
        )
    return record


def hits(project: Project) -> tuple[int, int]:
    found = ccache_hits((project.logs_dir / "build-cpu-amd64.log").read_text())
    assert found is not None
    return found


@pytest.mark.docker
@pytest.mark.slow
def test_a_seed_carries_the_compile_and_a_corrupt_one_only_slows_it(
    lab_project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = carry_project(lab_project, tmp_path / "project")
    exported = tmp_path / "ccache"
    # The compile itself runs (not its cached layer), so the mount holds what it compiled even
    # where BuildKit's garbage collection took the mount and left the layers.
    build_cpu(project, ccache_to=exported, no_cache_filter=("builder",))
    carried = exported / "cpu-amd64"
    size = ccache_bytes(carried)
    assert 1_000_000 < size < 2 * 1024**3, size  # entries, within CCACHE_MAXSIZE
    # A lock a killed ccache left behind: a symlink to a process's name that no longer exists
    # (in a directory ccache never locks, so only the export can drop it).
    (carried / "z").mkdir()
    (carried / "z" / "stats.lock").symlink_to("runner-1234-dead")
    # A fresh runner given the export: its empty mount is seeded, the compile is all hits.
    reexported = tmp_path / "reexported"
    seeded = build_cpu(
        project,
        ccache_from=exported,
        ccache_to=reexported,
        dockerfile=own_ccache_mount(project, "seeded-" + secrets.token_hex(4)),
        no_cache_filter=("builder",),
    )
    good, calls = hits(project)
    assert calls > 100 and good == calls, (good, calls)
    # What it hands on has no lock files: a CI cache saves it and the next runner copies it.
    assert not [p for p in reexported.rglob("*") if p.name.endswith((".lock", ".alive"))]
    assert ccache_bytes(reexported / "cpu-amd64") > size // 2
    (carried / "z" / "stats.lock").unlink()
    # Corrupt a tenth of the entries: each is a miss, recompiled, never a wrong object.
    files = sorted(p for p in carried.rglob("*") if p.is_file() and len(p.name) > 8)
    random.Random(7).shuffle(files)
    for entry in files[: len(files) // 10]:
        data = bytearray(entry.read_bytes())
        data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
        entry.write_bytes(bytes(data))
    corrupt = build_cpu(
        project,
        ccache_from=exported,
        dockerfile=own_ccache_mount(project, "corrupt-" + secrets.token_hex(4)),
        no_cache_filter=("builder",),
    )
    partial, calls_again = hits(project)
    # (A corrupt manifest also costs a preprocessor lookup: more cacheable calls, not fewer.)
    assert calls_again >= calls and 0 < partial < calls_again, (partial, calls_again)
    # A seed that is not there: the build says so and goes on (the Dockerfile's own empty
    # seed stands in, so this is the warm build the first one was, cache keys and all).
    capsys.readouterr()
    missing = build_cpu(project, ccache_from=tmp_path / "nothing-here")
    assert "ccache: no seed at" in capsys.readouterr().err
    # Each of them produced an image (whether their digests agree is not checked here).
    assert seeded.digest and corrupt.digest and missing.digest
    print(
        f"\nFIGURE ccache carried {size / 1e6:.1f} MB; seeded build {seeded.seconds:.0f} s "
        f"({good}/{calls} hits), corrupt seed {corrupt.seconds:.0f} s ({partial}/{calls_again})"
    )
