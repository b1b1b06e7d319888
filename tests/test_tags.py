"""The tag rules of pipeline/oci/tags.yaml and the per-tag decision, as pure functions."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from pipeline.core.errors import ConfigError
from pipeline.core.version import SemVer
from pipeline.oci.tags import (
    TAG_RULES_FILE,
    Action,
    ExistingTag,
    PlannedTag,
    TagKind,
    decide,
    load_tag_rules,
    parse_tag_rules,
)

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
INDEX = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def names(version: str, suffix: str = "", ref: str | None = None) -> list[str]:
    rules = load_tag_rules()
    backend = suffix or "cpu"
    return [t.name for t in rules.tags_for(SemVer.parse(version), backend, suffix, COMMIT, ref)]


def test_release_of_the_default_backend() -> None:
    assert names("1.2.3") == ["1.2.3", "1.2", "1", "latest", "sha-0c1e570"]


def test_release_of_another_backend_is_suffixed_and_floats_on_its_name() -> None:
    assert names("1.2.3", "vulkan") == [
        "1.2.3-vulkan",
        "1.2-vulkan",
        "1-vulkan",
        "vulkan",
        "sha-0c1e570-vulkan",
    ]


def test_llama_build_tag_only_when_the_ref_is_a_release_tag() -> None:
    assert "b6543" in names("1.2.3", ref="b6543")
    assert "b6543-cuda" in names("1.2.3", "cuda", ref="b6543")
    for ref in (None, "master", "b12x", "v1.0"):
        assert not [n for n in names("1.2.3", ref=ref) if n.startswith("b")], ref


def test_prerelease_gets_only_its_exact_tag() -> None:
    assert names("2.0.0-rc.1", ref="b6543") == ["2.0.0-rc.1"]
    assert names("2.0.0-rc.1", "vulkan") == ["2.0.0-rc.1-vulkan"]


def test_kinds() -> None:
    rules = load_tag_rules()
    kinds = {t.name: t.kind for t in rules.tags_for(SemVer.parse("1.2.3"), "cpu", "", COMMIT, "b1")}
    assert kinds == {
        "1.2.3": TagKind.IMMUTABLE,
        "1.2": TagKind.FLOATING,
        "1": TagKind.FLOATING,
        "latest": TagKind.FLOATING,
        # Upstream builds float forward: a packaging-only release of the pin moves them.
        "b1": TagKind.FLOATING,
        "sha-0c1e570": TagKind.FLOATING,
    }


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1.0.0", "1.0.1"),
        ("1.0.1", "1.1.0"),
        ("1.9.0", "1.10.0"),
        ("1.0.0-rc.1", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-alpha.1"),
        ("1.0.0-alpha.1", "1.0.0-alpha.beta"),
        ("1.0.0-beta.2", "1.0.0-beta.11"),
        ("1.0.0-rc.1", "1.0.0-rc.1a"),
        ("0.9.9", "1.0.0-rc.1"),
    ],
)
def test_semver_precedence(lower: str, higher: str) -> None:
    assert SemVer.parse(lower) < SemVer.parse(higher)
    assert SemVer.parse(higher) > SemVer.parse(lower)
    assert SemVer.parse("1.0.0+build.5") == SemVer.parse("1.0.0")


def tag(name: str, kind: TagKind) -> PlannedTag:
    return PlannedTag(name, kind, name)


def test_decisions() -> None:
    v = SemVer.parse("1.1.0")
    latest = tag("latest", TagKind.FLOATING)
    exact = tag("1.1.0", TagKind.IMMUTABLE)
    assert decide(latest, v, INDEX, None).action is Action.CREATE
    assert decide(latest, v, INDEX, ExistingTag(INDEX, None)).action is Action.UNCHANGED
    assert decide(latest, v, INDEX, ExistingTag(OTHER, "1.0.9")).action is Action.MOVE
    left = decide(latest, v, INDEX, ExistingTag(OTHER, "1.2.0"))
    assert left.action is Action.LEAVE and "newer 1.2.0" in left.reason
    assert decide(latest, v, INDEX, ExistingTag(OTHER, "1.1.0-rc.2")).action is Action.MOVE
    assert decide(latest, v, INDEX, ExistingTag(OTHER, "1.1.0")).action is Action.MOVE
    unknown = decide(latest, v, INDEX, ExistingTag(OTHER, None))
    assert unknown.action is Action.MOVE and "no semantic version" in unknown.reason
    conflict = decide(exact, v, INDEX, ExistingTag(OTHER, "1.1.0"))
    assert conflict.action is Action.CONFLICT and not conflict.pushes
    forced = decide(exact, v, INDEX, ExistingTag(OTHER, "1.1.0"), force=True)
    assert forced.action is Action.OVERWRITE and forced.pushes and "--force" in forced.reason
    assert decide(exact, v, INDEX, ExistingTag(INDEX, None), force=True).action is Action.UNCHANGED


def rules_data(**changes: Any) -> dict[str, Any]:
    """tags.yaml with top-level keys changed; `rules`: the stable channel's rules."""
    data: dict[str, Any] = yaml.safe_load(TAG_RULES_FILE.read_text())
    if "rules" in changes:
        data["channels"]["stable"] = changes.pop("rules")
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (rules_data(schema=1), "schema: 2"),
        (rules_data(default_backend="cpu"), "unknown key(s) 'default_backend'"),
        (rules_data(rules=[{"pattern": "{{nope}}", "kind": "floating"}]), "{{nope}}"),
        (rules_data(rules=[{"pattern": "x", "kind": "sticky"}]), "immutable or floating"),
        (rules_data(rules=[{"pattern": "x", "kind": "floating", "extra": 1}]), "'extra'"),
        (
            rules_data(rules=[{"pattern": "{{major}}", "kind": "floating", "prerelease": True}]),
            "cannot apply to prereleases",
        ),
        (rules_data(rules=[]), "non-empty list"),
    ],
)
def test_malformed_rules_are_rejected_with_the_reason(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_tag_rules(data)
    assert message in error.value.line()


def test_a_rule_making_an_invalid_tag_is_rejected() -> None:
    rules = parse_tag_rules(rules_data(rules=[{"pattern": "-{{version}}", "kind": "immutable"}]))
    with pytest.raises(ConfigError, match="not a valid tag"):
        rules.tags_for(SemVer.parse("1.0.0"), "cpu", "", COMMIT, None)


def test_the_edge_channel_follows_upstream_builds() -> None:
    rules = load_tag_rules()

    def edge(backend: str, suffix: str) -> list[str]:
        planned = rules.tags_for(SemVer.parse("0.1.1"), backend, suffix, COMMIT, "b7", "edge")
        return [t.name for t in planned]

    assert edge("cpu", "") == ["edge", "b7"]
    assert edge("vulkan", "vulkan") == ["edge-vulkan", "b7-vulkan"]
    (moving, _) = rules.tags_for(SemVer.parse("0.1.1"), "cpu", "", COMMIT, "b7", "edge")
    v = SemVer.parse("0.1.1")
    # Newer upstream moves edge even at a lower version; an older one leaves it.
    assert decide(moving, v, INDEX, ExistingTag(OTHER, "0.1.2", 6), llama_build=7).pushes
    left = decide(moving, v, INDEX, ExistingTag(OTHER, "0.1.0", 8), llama_build=7)
    assert left.action is Action.LEAVE and "newer upstream b8" in left.reason
    # The same upstream build: the newer packaging wins, by version.
    assert decide(moving, v, INDEX, ExistingTag(OTHER, "0.1.0", 7), llama_build=7).pushes
    same = decide(moving, v, INDEX, ExistingTag(OTHER, "0.1.2", 7), llama_build=7)
    assert same.action is Action.LEAVE


def test_build_metadata_is_left_out_of_tags() -> None:
    # `+` cannot appear in a tag, and SemVer says build metadata does not order versions.
    assert names("1.0.0+build.5")[0] == "1.0.0"


# ---------------------------------------------------------------------------- collisions
@pytest.mark.parametrize(
    ("suffix", "tag"),
    [("latest", "latest"), ("sha-0c1e570", "sha-0c1e570"), ("0", "0")],
    ids=["floating-latest", "an-immutable-tag", "the-major-tag"],
)
def test_two_backends_with_one_tag_are_refused_when_the_files_are_loaded(
    suffix: str, tag: str, tmp_path: Any
) -> None:
    """A backend whose tag suffix is a tag the default backend gets: the second backend's
    push would overwrite the first's tags in the same run. Refused when PublishOptions load
    tags.yaml beside the matrix (exit 3), before any registry is asked."""
    import json
    import shutil

    from fixtures.lab import REPO_ROOT

    from pipeline.core.project import Project
    from pipeline.matrix import MATRIX_FILE, parse_matrix
    from pipeline.publish.options import PublishOptions

    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO_ROOT / "version.json", root / "version.json")
    version = json.loads((root / "version.json").read_text())
    assert version["version"].startswith("0.") and version["llama_cpp"]["commit"][:7] == "0c1e570"
    raw = yaml.safe_load(MATRIX_FILE.read_text())
    raw["backends"]["vulkan"]["tag_suffix"] = suffix
    with pytest.raises(ConfigError) as caught:
        PublishOptions.named(Project(root), matrix=parse_matrix(raw), env={})
    line = caught.value.line()
    assert caught.value.exit_code == 3 and "\n" not in line
    assert f"backends cpu and vulkan would both get the tag '{tag}'" in line, line
    # The shipped files give every backend tags of its own.
    assert PublishOptions.named(Project(root), env={}).rules == load_tag_rules()


def test_every_backend_of_the_matrix_gets_tags_of_its_own() -> None:
    from pipeline.matrix import load_matrix

    backends = [(b.name, b.tag_suffix) for b in load_matrix().backends.values()]
    rules = load_tag_rules()
    for version, ref in (("0.1.0", None), ("1.2.3", "b6543"), ("2.0.0-rc.1", "b1")):
        rules.check_backends(backends, SemVer.parse(version), COMMIT, ref)
    with pytest.raises(
        ConfigError, match=re.escape("backends a and b would both get the tag '1.0.0-x'")
    ):
        rules.check_backends(
            [("cpu", ""), ("a", "x"), ("b", "x")], SemVer.parse("1.0.0"), COMMIT, None
        )
