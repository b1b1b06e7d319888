"""An image's shared-library closure: does every DT_NEEDED of every ELF file in it resolve
inside the image, the way glibc's loader would look?

Read from the image's filesystem as a tar stream (`docker export` of a created, never started
container, so a foreign platform needs no emulator). ELF files are parsed here (section
headers: .dynamic and its string table), not by running anything of the image's. A library
the host provides at run time (the NVIDIA driver's libcuda.so.1, mounted by the container
toolkit) is named per backend in matrix.yaml and left out.
"""

from __future__ import annotations

import json
import posixpath
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, cast

ELF_MAGIC = b"\x7fELF"
SHT_DYNAMIC = 6
DT_NEEDED, DT_RPATH, DT_RUNPATH = 1, 15, 29
# glibc's trusted directories after ld.so.cache (Debian/Ubuntu multiarch first).
DEFAULT_DIRS = (
    "/lib/{triplet}",
    "/usr/lib/{triplet}",
    "/lib",
    "/usr/lib",
    "/lib64",
    "/usr/lib64",
)
TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}


@dataclass(frozen=True)
class DynamicInfo:
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    rpath: tuple[str, ...]


def read_dynamic(data: bytes) -> DynamicInfo | None:
    """DT_NEEDED, DT_RUNPATH and DT_RPATH of an ELF file; None for one without a dynamic
    section (static executables, object files) or that is not ELF at all."""
    if len(data) < 64 or data[:4] != ELF_MAGIC:
        return None
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        shoff, shentsize, shnum = (
            struct.unpack_from(end + "Q", data, 0x28)[0],
            *struct.unpack_from(end + "HH", data, 0x3A),
        )
        section_fmt, entry_fmt = end + "IIQQQQIIQQ", end + "qQ"
    else:
        shoff, shentsize, shnum = (
            struct.unpack_from(end + "I", data, 0x20)[0],
            *struct.unpack_from(end + "HH", data, 0x2E),
        )
        section_fmt, entry_fmt = end + "IIIIIIIIII", end + "iI"
    if shoff == 0 or shoff + shnum * shentsize > len(data):
        return None
    sections = [struct.unpack_from(section_fmt, data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next((s for s in sections if s[1] == SHT_DYNAMIC), None)
    if dynamic is None or dynamic[6] >= len(sections):
        return None
    strtab = sections[dynamic[6]]  # sh_link: the string table of .dynamic
    str_offset, entry_size = strtab[4], struct.calcsize(entry_fmt)

    def string(offset: int) -> str:
        start = str_offset + offset
        return data[start : data.index(b"\0", start)].decode("utf-8", "replace")

    needed: list[str] = []
    runpath: list[str] = []
    rpath: list[str] = []
    for i in range(dynamic[5] // entry_size):
        tag, value = struct.unpack_from(entry_fmt, data, dynamic[4] + i * entry_size)
        if tag == 0:
            break
        if tag == DT_NEEDED:
            needed.append(string(value))
        elif tag in (DT_RUNPATH, DT_RPATH):
            (runpath if tag == DT_RUNPATH else rpath).extend(string(value).split(":"))
    return DynamicInfo(tuple(needed), tuple(runpath), tuple(rpath))


@dataclass
class ImageTree:
    """The paths of an image's filesystem: files, directories, symlinks (with targets), and
    the dynamic info of its ELF files."""

    files: set[str] = field(default_factory=set)
    sizes: dict[str, int] = field(default_factory=dict)  # regular file -> bytes
    links: dict[str, str] = field(default_factory=dict)
    elves: dict[str, DynamicInfo] = field(default_factory=dict)
    ld_conf: dict[str, bytes] = field(default_factory=dict)
    # Vulkan ICD manifest -> the driver library it names: the loader dlopens it, so no NEEDED
    # entry anywhere says the image must carry it.
    vulkan_drivers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_chunks(cls, chunks: Iterable[bytes]) -> ImageTree:
        """From `docker export`'s tar stream, as docker-py hands it over in chunks."""
        return cls.from_tar(_ChunkReader(iter(chunks)))

    @classmethod
    def from_tar(cls, stream: IO[bytes] | _ChunkReader) -> ImageTree:
        tree = cls()
        with tarfile.open(fileobj=cast(Any, stream), mode="r|") as tar:
            for member in tar:
                path = "/" + member.name.removeprefix("./").strip("/")
                if member.issym():
                    tree.links[path] = member.linkname
                elif member.islnk():
                    tree.links[path] = "/" + member.linkname.removeprefix("./")
                elif member.isfile():
                    tree.files.add(path)
                    tree.sizes[path] = member.size
                    handle = tar.extractfile(member)
                    if handle is None:
                        continue
                    head = handle.read(4)
                    if head == ELF_MAGIC:
                        info = read_dynamic(head + handle.read())
                        if info is not None:
                            tree.elves[path] = info
                    elif path == "/etc/ld.so.conf" or path.startswith("/etc/ld.so.conf.d/"):
                        tree.ld_conf[path] = head + handle.read()
                    elif _is_icd_manifest(path):
                        tree.vulkan_drivers[path] = _icd_library(head + handle.read())
        return tree

    def resolve(self, path: str, depth: int = 0) -> str | None:
        """`path` with every symlink in it followed, inside the image; None when absent."""
        if depth > 40:
            return None
        parts = [p for p in path.split("/") if p]
        current = "/"
        for index, part in enumerate(parts):
            candidate = posixpath.join(current, part)
            if candidate in self.links:
                target = self.links[candidate]
                base = target if target.startswith("/") else posixpath.join(current, target)
                rest = "/".join(parts[index + 1 :])
                return self.resolve(posixpath.normpath(posixpath.join(base, rest)), depth + 1)
            current = candidate
        return current if current in self.files else None

    def conf_dirs(self) -> list[str]:
        """Directories ld.so.conf (and the files it includes) lists, in order."""
        dirs: list[str] = []
        for text in self.ld_conf.values():
            for line in text.decode("utf-8", "replace").splitlines():
                line = line.split("#", 1)[0].strip()
                if line and not line.startswith("include"):
                    dirs.append(line)
        return dirs


# Where the Vulkan loader looks for driver manifests (its default XDG directories).
ICD_DIRS = ("/usr/share/vulkan/icd.d/", "/usr/local/share/vulkan/icd.d/", "/etc/vulkan/icd.d/")


def _is_icd_manifest(path: str) -> bool:
    return path.endswith(".json") and path.startswith(ICD_DIRS)


def _icd_library(text: bytes) -> str:
    """The library_path of an ICD manifest ("" when it names none or is not JSON)."""
    try:
        data = json.loads(text)
    except ValueError:
        return ""
    icd = data.get("ICD") if isinstance(data, dict) else None
    path = icd.get("library_path") if isinstance(icd, dict) else None
    return path if isinstance(path, str) else ""


@dataclass(frozen=True)
class Unresolved:
    elf: str
    library: str


def _expand(entry: str, origin: str) -> str:
    return entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)


def closure_gaps(
    tree: ImageTree, arch: str, host_provided: Iterable[str] = (), env_path: str = ""
) -> list[Unresolved]:
    """Every (ELF, NEEDED library) pair that resolves nowhere in the image, in path order."""
    provided = set(host_provided)
    triplet = TRIPLETS.get(arch, "")
    defaults = [d.format(triplet=triplet) for d in DEFAULT_DIRS]
    extra = [p for p in env_path.split(":") if p]
    system = [*tree.conf_dirs(), *defaults]  # ld.so.conf's directories, then the defaults
    gaps: list[Unresolved] = []
    for path in sorted(tree.elves):
        info = tree.elves[path]
        origin = posixpath.dirname(path)
        # DT_RPATH counts only without DT_RUNPATH; LD_LIBRARY_PATH comes between them.
        before = [] if info.runpath else [_expand(e, origin) for e in info.rpath]
        search = [*before, *extra, *(_expand(e, origin) for e in info.runpath)]
        search += system
        for library in info.needed:
            if library in provided:
                continue
            if "/" in library:
                found = tree.resolve(library)
            else:
                found = next(
                    (hit for d in search if d if (hit := tree.resolve(f"{d}/{library}"))), None
                )
            if found is None:
                gaps.append(Unresolved(path, library))
    # A manifest's bare library name is dlopened: the default directories (ld.so.conf's too).
    for manifest, library in sorted(tree.vulkan_drivers.items()):
        if not library:
            gaps.append(Unresolved(manifest, "(no library_path)"))
            continue
        candidates = [library] if "/" in library else [f"{d}/{library}" for d in system]
        if not any(tree.resolve(c) for c in candidates):
            gaps.append(Unresolved(manifest, library))
    return gaps


def describe_gaps(gaps: list[Unresolved], limit: int = 4) -> str:
    shown = "; ".join(f"{g.elf} needs {g.library}" for g in gaps[:limit])
    more = f" (and {len(gaps) - limit} more)" if len(gaps) > limit else ""
    return f"{shown}{more}"


class _ChunkReader:
    """A read()-able stream over chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buffer) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        if size < 0:
            data, self.buffer = self.buffer, b""
        else:
            data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data
