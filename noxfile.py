"""Sessions are wiring only: each installs the package and hands its posargs to one stage.

The logic lives in `pipeline/` (see `python -m pipeline --help`), testable without nox.
A plain `nox` runs the main job: sync -> build -> smoke of the default image.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["sync", "build", "smoke"]
nox.options.reuse_venv = "yes"
# uv makes a session's venv in about 3 s where pip takes about 12 (each of the main job's three
# sessions has its own); plain virtualenv where uv is missing.
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


def _stage(session: nox.Session, stage: str, *extras: str) -> None:
    """Install the pipeline (plus extras) and run one stage with the session's posargs."""
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-q", "-e", spec)
    session.run("python", "-m", "pipeline", stage, *session.posargs)


@nox.session(python=PYTHON)
def sync(session: nox.Session) -> None:
    """Fetch the pinned llama.cpp commit into third_party/llama.cpp/vendor (--check, --no-prune)."""
    _stage(session, "sync")


@nox.session(python=PYTHON)
def bump(session: nox.Session) -> None:
    """Move version.json's pin to a ref on the remote (default: newest b<number> tag), then
    re-render the Dockerfiles (their defaults name the pin): commit both."""
    _stage(session, "bump")
    session.run("python", "-m", "pipeline", "render")


@nox.session(python=PYTHON)
def render(session: nox.Session) -> None:
    """Render the Dockerfiles of every backend into dockerfiles/rendered/ (committed)."""
    _stage(session, "render")


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build images with buildx: nox -s build -- [arm64|amd64 ...] [--backend cpu,vulkan]."""
    _stage(session, "build")


@nox.session(python=PYTHON)
def smoke(session: nox.Session) -> None:
    """Run an image and check its live server: nox -s smoke -- [IMAGE] [--platform P]."""
    _stage(session, "smoke")


@nox.session(python=PYTHON)
def publish(session: nox.Session) -> None:
    """Tag and push smoke-tested digests: nox -s publish -- --dry-run."""
    _stage(session, "publish")


@nox.session(python=PYTHON)
def track(session: nox.Session) -> None:
    """The release train: the newest upstream release (or -- REF) built, proven, on edge."""
    _stage(session, "track")


@nox.session(python=PYTHON)
def promote(session: nox.Session) -> None:
    """Move the stable tags to a candidate's digests if it passes the gates: -- [CANDIDATE]."""
    _stage(session, "promote")


@nox.session(python=PYTHON)
def verify(session: nox.Session) -> None:
    """Check a published image's signature, smoke attestations and SBOM: -- IMAGE[:TAG]."""
    _stage(session, "verify")


@nox.session(python=PYTHON)
def models(session: nox.Session) -> None:
    """The model catalogue: nox -s models -- list | pull NAME [--into DIR] | recommend."""
    _stage(session, "models")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Measure sync/build/size/smoke against upstream's own Dockerfile."""
    _stage(session, "bench", "bench")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest); posargs go to pytest."""
    # bench: its chart and `bench --only sync,size` are tested.
    session.install("-q", "-e", ".[test,bench]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    # bench too: mypy follows pipeline.bench.report into matplotlib.
    session.install("-q", "-e", ".[lint,test,bench]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
