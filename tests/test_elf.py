"""The library-closure reader on real ELF files (this machine's own ls and its libraries), laid
out as an image's tar stream; the real images' closure is a smoke check (tests/test_smoke.py,
tests/test_cuda.py)."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from fixtures.lab import require_lab

from pipeline.oci.elf import ImageTree, Unresolved, closure_gaps, describe_gaps, read_dynamic

TRIPLET = "x86_64-linux-gnu"


def needed_by_readelf(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


@pytest.fixture
def ls_closure() -> dict[str, Path]:
    """/bin/ls and the libraries it needs, by the name the loader looks for."""
    ls = Path(shutil.which("ls") or "/bin/ls").resolve()
    require_lab(
        shutil.which("readelf") is not None and Path(f"/lib/{TRIPLET}").is_dir(),
        f"readelf and an {TRIPLET} userland (this test reads real ELF files)",
    )
    files = {"ls": ls}
    queue = [ls]
    while queue:
        for name in needed_by_readelf(queue.pop()):
            if name not in files and (found := Path(f"/lib/{TRIPLET}/{name}")).exists():
                files[name] = found.resolve()
                queue.append(found.resolve())
    return files


def tar_of(entries: dict[str, Path | str]) -> io.BytesIO:
    """A tar stream: a Path is a file's content, a str a symlink's target."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, source in entries.items():
            if isinstance(source, Path):
                tar.add(source, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, source
                tar.addfile(info)
    buffer.seek(0)
    return buffer


def test_read_dynamic_agrees_with_readelf(ls_closure: dict[str, Path]) -> None:
    for path in ls_closure.values():
        info = read_dynamic(path.read_bytes())
        assert info is not None and list(info.needed) == needed_by_readelf(path), path
    assert read_dynamic(b"#!/bin/sh\necho not an ELF file\n" * 4) is None


def test_a_complete_closure_resolves_and_a_missing_library_is_named(
    ls_closure: dict[str, Path],
) -> None:
    libraries = {n: p for n, p in ls_closure.items() if n != "ls"}
    image = {
        "usr/bin/ls": ls_closure["ls"],
        # usrmerge: /lib is a symlink into /usr, as in Debian's images.
        "lib": "usr/lib",
        **{f"usr/lib/{TRIPLET}/{name}": path for name, path in libraries.items()},
    }
    tree = ImageTree.from_tar(tar_of(image))
    assert tree.resolve(f"/lib/{TRIPLET}/libc.so.6") == f"/usr/lib/{TRIPLET}/libc.so.6"
    assert closure_gaps(tree, "amd64") == []
    missing = next(n for n in libraries if n.startswith("libselinux") or n.startswith("libc."))
    del image[f"usr/lib/{TRIPLET}/{missing}"]
    gaps = closure_gaps(ImageTree.from_tar(tar_of(image)), "amd64")
    assert gaps and all(g.library == missing for g in gaps)
    assert f"/usr/bin/ls needs {missing}" in describe_gaps(gaps)
    # A library the host provides at run time is left out.
    assert closure_gaps(ImageTree.from_tar(tar_of(image)), "amd64", [missing]) == []


def test_runpath_origin_is_where_a_library_is_found(ls_closure: dict[str, Path]) -> None:
    """ggml's modules sit beside llama-server, found through RUNPATH $ORIGIN: a library in
    /app resolves for an ELF whose RUNPATH says so, and for no other."""
    libc = ls_closure["libc.so.6"]
    image = {"app/ls": ls_closure["ls"], **{f"app/{n}": p for n, p in ls_closure.items()}}
    gaps = closure_gaps(ImageTree.from_tar(tar_of(image)), "amd64")
    assert {g.library for g in gaps} >= {"libc.so.6"}  # ls has no RUNPATH: /app is not searched
    assert closure_gaps(ImageTree.from_tar(tar_of(image)), "amd64", env_path="/app") == []
    assert libc.exists()


def test_a_vulkan_manifests_driver_must_be_in_the_image(
    ls_closure: dict[str, Path], tmp_path: Path
) -> None:
    """The loader dlopens the library an ICD manifest names (a bare name: the default
    directories): nothing NEEDS it, yet an image without it finds no device."""
    manifest = tmp_path / "lvp_icd.json"
    manifest.write_text('{"ICD": {"api_version": "1.4.305", "library_path": "libvulkan_lvp.so"}}')
    libraries = {f"lib/{TRIPLET}/{n}": p for n, p in ls_closure.items() if n != "ls"}
    image: dict[str, Path | str] = {
        "bin/ls": ls_closure["ls"],
        **libraries,
        "usr/share/vulkan/icd.d/lvp_icd.json": manifest,
    }
    gaps = closure_gaps(ImageTree.from_tar(tar_of(image)), "amd64")
    assert gaps == [Unresolved("/usr/share/vulkan/icd.d/lvp_icd.json", "libvulkan_lvp.so")]
    # Any ELF file stands in for the driver: what counts is that the name resolves.
    image[f"lib/{TRIPLET}/libvulkan_lvp.so"] = ls_closure["libc.so.6"]
    assert closure_gaps(ImageTree.from_tar(tar_of(image)), "amd64") == []
    manifest.write_text('{"ICD": {}}')
    gaps = closure_gaps(ImageTree.from_tar(tar_of(image)), "amd64")
    assert [g.library for g in gaps] == ["(no library_path)"]
