"""The test suite's fixtures live in tests/fixtures/, one plugin per area: the lab, fake
upstream git repositories, registries, the real images, the local Hub, signing keys."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "fixtures.lab",
    "fixtures.git_repos",
    "fixtures.registry",
    "fixtures.images",
    "fixtures.hub",
    "fixtures.signing",
    "fixtures.github",
    "fixtures.apt_repo",
]

# Fixtures that need the provisioned lab (.ci/provision) but no Docker engine: a test using
# any of them, directly or through another fixture, is marked `lab`, so a machine without the
# lab (GitHub's runners: ci.yml) deselects it instead of failing on it.
LAB_FIXTURES = frozenset(
    {"upstream_mirror", "cosign_keys", "other_keys", "docker_engine", "real_gguf"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)
