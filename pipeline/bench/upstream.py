"""Upstream's own image build (`.devops/cpu.Dockerfile`, target `server`), made buildable offline.

Two stand-ins, both recorded in the report, nothing else changed:
- its `web` stage runs `npm ci` on `docker.io/node`, neither reachable here: a named build context
  called `web` replaces the stage, holding a placeholder `app/tools/ui/dist` with the eight files
  scripts/ui-assets.cmake insists on (index.html, manifest, sw.js, ...);
- its `FROM docker.io/ubuntu:24.04` resolves through the daemon's registry mirror, where the lab's
  `debian:trixie` is copied under `library/ubuntu:24.04`, so both sides build on the same base.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import BuildError, ConfigError
from pipeline.oci.buildx import docker_cli, last_line

DOCKERFILE = ".devops/cpu.Dockerfile"
TARGET = "server"
WEB_STAGE = "web"
LAB_REGISTRY = "127.0.0.1:5000"
LAB_BASE = f"{LAB_REGISTRY}/library/debian:trixie"
# What scripts/ui-assets.cmake (ui_validate_assets) requires of a prebuilt dist tree; every
# file must be non-empty (it refuses empty ones).
PLACEHOLDER_DIST = {
    "index.html": "<!doctype html><title>llama.cpp</title><p>UI placeholder (benchmark)</p>\n",
    "manifest.webmanifest": '{"name": "llama.cpp", "start_url": "/"}\n',
    "sw.js": "// placeholder service worker\n",
    "build.json": '{"placeholder": true}\n',
    "version.json": '{"version": "bench"}\n',
    "bundle-bench.js": "// placeholder bundle\n",
    "bundle-bench.css": "/* placeholder bundle */\n",
    "workbox-bench.js": "// placeholder workbox\n",
}


@dataclass(frozen=True)
class UpstreamBuild:
    """How upstream's server image is built here, and what was substituted to make it build."""

    context: Path  # the unpruned source tree (upstream's build context)
    dockerfile: Path
    web_context: Path
    base_from: str  # the image name upstream's FROM lines use
    base_alias: str  # where the lab base was copied so that name resolves
    dist_path: str  # path the Dockerfile copies from the web stage

    def substitutions(self) -> list[str]:
        return [
            f"stage `{WEB_STAGE}` (node, npm ci, npm run build) replaced by a named build context "
            f"holding a placeholder `{self.dist_path}` of {len(PLACEHOLDER_DIST)} small files "
            f"({', '.join(sorted(PLACEHOLDER_DIST))}): the real UI is not built, so upstream's "
            "llama-server embeds a few hundred bytes instead of its web UI",
            f"`FROM {self.base_from}` resolves to the lab's `debian:trixie` (minbase), "
            f"copied to {self.base_alias}; the apt packages upstream installs (gcc-14 g++-14 "
            "build-essential git cmake libssl-dev; libgomp1 curl ffmpeg) exist in trixie",
            "the build context is the unpruned snapshot without `.git`, so upstream's CMake "
            "reports build number 0 (its .dockerignore keeps .git for that)",
        ]


def base_image_name(dockerfile_text: str) -> str:
    """The image upstream's build and runtime stages start FROM, its ARG defaults expanded
    (e.g. `docker.io/ubuntu:24.04`)."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile_text, flags=re.MULTILINE))
    names = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", dockerfile_text, flags=re.MULTILINE)
    for image, stage in names:
        if stage == "build":
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
    raise ConfigError(f"upstream {DOCKERFILE} has no `FROM ... AS build` line")


def dist_copy_path(dockerfile_text: str) -> str:
    """The path upstream copies out of its web stage (`COPY --from=web <path> ...`)."""
    match = re.search(rf"^COPY\s+--from={WEB_STAGE}\s+(\S+)\s", dockerfile_text, re.MULTILINE)
    if not match:
        raise ConfigError(f"upstream {DOCKERFILE} does not copy from a `{WEB_STAGE}` stage")
    return match.group(1)


def mirror_name(image: str, registry: str = LAB_REGISTRY) -> str:
    """Where the daemon's registry mirror looks for a Docker Hub image: `docker.io/ubuntu:24.04`
    and `ubuntu:24.04` are both `<registry>/library/ubuntu:24.04`."""
    name = image.removeprefix("docker.io/")
    if "/" not in name.split(":", 1)[0]:
        name = f"library/{name}"
    return f"{registry}/{name}"


def write_web_context(directory: Path, dist_path: str) -> Path:
    """A directory to pass as `--build-context web=...`: the placeholder dist at `dist_path`."""
    if directory.exists():
        shutil.rmtree(directory)
    dist = directory / dist_path.lstrip("/")
    dist.mkdir(parents=True)
    for name, text in PLACEHOLDER_DIST.items():
        (dist / name).write_text(text, encoding="utf-8")
    return directory


def alias_base(base_from: str, source: str = LAB_BASE) -> str:
    """Copy the lab base (an index, all its platforms) to the name upstream's FROM resolves to
    through the mirror; registry-side, no layers move."""
    target = mirror_name(base_from)
    result = docker_cli("buildx", "imagetools", "create", "-t", target, source)
    if result.returncode != 0:
        raise BuildError(
            f"cannot alias {source} as {target}: {last_line(result)}",
            "is the lab registry up? run .ci/provision",
        )
    return target


def prepare(source_tree: Path, work_dir: Path) -> UpstreamBuild:
    """Everything upstream's Dockerfile needs besides the compile: web context and base alias."""
    dockerfile = source_tree / DOCKERFILE
    if not dockerfile.is_file():
        raise ConfigError(
            f"{dockerfile} not found", "the upstream side needs an unpruned snapshot (--no-prune)"
        )
    text = dockerfile.read_text(encoding="utf-8")
    dist = dist_copy_path(text)
    base = base_image_name(text)
    web = write_web_context(work_dir / "upstream-web-context", dist)
    alias = alias_base(base)
    return UpstreamBuild(source_tree, dockerfile, web, base, alias, dist)


def build_command(
    build: UpstreamBuild, tag: str, *, platform: str = "linux/amd64", no_cache: bool
) -> list[str]:
    command = [
        "docker",
        "buildx",
        "build",
        "--progress=plain",
        "--platform",
        platform,
        "--target",
        TARGET,
        "-f",
        str(build.dockerfile),
        "--build-context",
        f"{WEB_STAGE}={build.web_context}",
        # As pipeline.build does for --load: no attestation manifest beside the image.
        "--provenance=false",
        "--load",
        "-t",
        tag,
    ]
    if no_cache:
        command.append("--no-cache")
    command.append(str(build.context))
    return command
