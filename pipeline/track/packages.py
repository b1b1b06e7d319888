"""Whether the stable images carry a Debian package with a newer version in the apt sources
their builds install from: a packaging-only release of the same pin (security updates reach
users without an upstream release).

What the images carry is read from their SBOMs, as their signed attestations say (verified with
the same key or identity `nox -s verify` uses); what is newer, from apt in a container of each
backend's builder image, with the train's extra apt sources, as the builds see them.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

from pipeline.core import console
from pipeline.core.errors import PipelineError
from pipeline.matrix import Backend
from pipeline.oci.buildx import docker_cli, docker_config
from pipeline.oci.cosign import SBOM_PREDICATE, Cosign, verifier_from_env
from pipeline.oci.registry import RegistryClient
from pipeline.oci.tags import STABLE, load_tag_rules
from pipeline.track.options import TrackOptions

# Prints "name arch shipped newer" for each of PACKAGES ("name version arch" lines) apt has a
# newer version of.
_NEWER = r"""
set -eu
if [ -n "$EXTRA_APT_SOURCES" ]; then
    printf '%s\n' "$EXTRA_APT_SOURCES" >/etc/apt/sources.list.d/train.list
fi
for arch in $ARCHES; do dpkg --add-architecture "$arch"; done
apt-get update -qq >/dev/null 2>&1 || apt-get update -qq >&2
printf '%s\n' "$PACKAGES" | while read -r name version arch; do
    # Architecture-independent packages have no :all qualifier in apt's cache.
    case $arch in all) package=$name ;; *) package=$name:$arch ;; esac
    candidate=$(apt-cache policy "$package" | sed -n 's/^ *Candidate: //p')
    case $candidate in ""|"(none)") continue ;; esac
    if dpkg --compare-versions "$candidate" gt "$version"; then
        echo "$name $arch $version $candidate"
    fi
done
"""


def _shipped(options: TrackOptions, backend: Backend, cosign: Cosign) -> set[tuple[str, str, str]]:
    """(package, version, arch) of every Debian package the backend's stable images carry."""
    tag = load_tag_rules().head(STABLE, backend.tag_suffix)
    repository = options.repository
    with RegistryClient.for_access(repository.registry, options.access) as client:
        index = client.manifest(repository.repository, tag)
        images = list(client.platform_images(repository.repository, index)) if index else []
    verifier = verifier_from_env(None, options.env.get("COSIGN_IDENTITY"), None, options.env)
    packages = set()
    for image in images:
        ref = f"{repository}@{image.digest}"
        for statement in cosign.attested(verifier, ref, SBOM_PREDICATE):
            for component in (statement.get("predicate") or {}).get("components") or []:
                purl = str(component.get("purl", ""))
                if purl.startswith("pkg:deb/"):
                    name_version, _, query = purl.removeprefix("pkg:deb/debian/").partition("?")
                    name, _, version = name_version.partition("@")
                    arch = query.removeprefix("arch=")
                    packages.add((name, unquote(version), arch))
    return packages


def _newer_in(image: str, packages: Iterable[tuple[str, str, str]], sources: str) -> list[str]:
    listed = sorted(packages)
    arches = sorted({arch for _, _, arch in listed if arch != "all"})
    done = docker_cli(
        "run",
        "--rm",
        "-e",
        f"EXTRA_APT_SOURCES={sources}",
        "-e",
        f"ARCHES={' '.join(arches)}",
        "-e",
        "PACKAGES=" + "\n".join(f"{n} {v} {a}" for n, v, a in listed),
        image,
        "sh",
        "-c",
        _NEWER,
        timeout=600,
    )
    if done.returncode != 0:
        raise PipelineError(f"apt in {image} failed: {done.stderr.strip()[-300:]}")
    return [
        f"{name} {shipped} -> {newer} ({arch})"
        for name, arch, shipped, newer in (line.split() for line in done.stdout.splitlines())
    ]


def newer_packages(options: TrackOptions) -> list[str]:
    """Every package of the stable images apt has a newer version of ("libfoo 1-1 -> 1-2
    (amd64)"); nothing when there is no key or identity to trust the SBOMs with."""
    if not (options.env.get("COSIGN_PUBLIC_KEY") or options.env.get("COSIGN_IDENTITY")):
        console.err.print(
            "track: packages not checked: no COSIGN_PUBLIC_KEY or COSIGN_IDENTITY to trust the "
            "stable images' SBOMs with",
            markup=False,
        )
        return []
    updates: list[str] = []
    repository = options.repository
    credentials = options.access.credentials(repository.registry)
    auths = {repository.registry: credentials} if credentials else {}
    with docker_config(auths) as config_dir:
        cosign = Cosign(options.env, config_dir)
        by_builder: dict[str, set[tuple[str, str, str]]] = {}
        for backend in options.backends:
            by_builder.setdefault(backend.builder_image, set()).update(
                _shipped(options, backend, cosign)
            )
    for image, packages in by_builder.items():
        if packages:
            updates += _newer_in(image, packages, "\n".join(options.apt_sources))
    return sorted(set(updates))
