"""Records are trusted no further than their schema: the one loader (records/schema.py and each
record's `validate`) refuses a build or smoke record whose values are not what this pipeline
writes, whichever stage reads it: exit 15, one line naming the file and the key. Checked here
through `publish --dry-run`, the stage that would sign and publish what the records say."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.lab import PINNED_COMMIT, REPO_ROOT

from pipeline import cli
from pipeline.core.project import Project
from pipeline.records import (
    BuildRecord,
    CheckResult,
    SmokeRecord,
    load_build_records,
    load_smoke_records,
    write_record,
)

DIGEST = "sha256:" + "a" * 64
IMAGE = "127.0.0.1:5000/acme/llama-server"
VERSION = json.loads((REPO_ROOT / "version.json").read_text())["version"]


def good_build() -> BuildRecord:
    return BuildRecord(
        backend="cpu",
        platform="linux/amd64",
        image=IMAGE,
        ref=f"{IMAGE}@{DIGEST}",
        digest=DIGEST,
        output="push-by-digest",
        commit=PINNED_COMMIT,
        version=VERSION,
        size_bytes=None,
        seconds=1.0,
        cpu_variants="all",
        sbom="sbom-cpu-amd64.cdx.json",
    )


def good_smoke() -> SmokeRecord:
    return SmokeRecord(
        image=f"{IMAGE}@{DIGEST}",
        digest=DIGEST,
        backend="cpu",
        platform="linux/amd64",
        passed=True,
        seconds=1.0,
        checks=(CheckResult("health", True, 0.1), CheckResult("completion", True, 0.2)),
    )


@pytest.fixture
def reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose reports hold a good build and smoke record (and the SBOM)."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO_ROOT / "version.json", root / "version.json")
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    directory = Project(root).reports_dir
    write_record(directory, good_build())
    write_record(directory, good_smoke())
    (directory / "sbom-cpu-amd64.cdx.json").write_text("{}")
    return directory


def spoil(path: Path, key: str, value: Any) -> None:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


FAILED = [
    {"name": "health", "passed": True, "seconds": 0.1},
    {"name": "completion", "passed": False, "seconds": 0.2, "detail": "3 tokens, asked 8"},
]
# (record, key, value, words the line must hold): each a record this pipeline never writes.
BAD: dict[str, tuple[str, str, Any, str]] = {
    "sbom-absolute": ("build", "sbom", "/etc/shadow", "key 'sbom' is '/etc/shadow'"),
    "sbom-parent": ("build", "sbom", "../../home/me/.ssh/id_ed25519", "key 'sbom'"),
    "sbom-separator": ("build", "sbom", "sub/sbom.json", "key 'sbom' is 'sub/sbom.json'"),
    "sbom-dots": ("build", "sbom", "..", "key 'sbom' is '..'"),
    "sbom-backslash": ("build", "sbom", "..\\secret", "key 'sbom'"),
    "digest": ("build", "digest", "sha256:1234", "key 'digest' is 'sha256:1234'"),
    "digest-line-break": ("build", "digest", DIGEST + "\n", "key 'digest'"),
    "sbom-line-break": ("build", "sbom", "sbom-cpu-amd64.cdx.json\n", "key 'sbom'"),
    "commit-line-break": ("build", "commit", PINNED_COMMIT + "\n", "key 'commit'"),
    "index-digest": ("build", "index_digest", "md5:" + "0" * 32, "key 'index_digest'"),
    "image-not-a-name": ("build", "image", "Evil Image\nRUN x", "key 'image'"),
    "image-with-tag": ("build", "image", f"{IMAGE}:latest", "key 'image'"),
    "ref-elsewhere": ("build", "ref", f"evil.example/x@{DIGEST}", "key 'ref'"),
    "output": ("build", "output", "tarball", "key 'output' is 'tarball'"),
    "commit": ("build", "commit", "HEAD", "key 'commit' is 'HEAD'"),
    "backend-path": ("build", "backend", "../../x", "key 'backend'"),
    "platform-path": ("build", "platform", "linux/../../etc", "key 'platform'"),
    "passed-but-failed": ("smoke", "checks", FAILED, "key 'passed' is True"),
    "passed-without-checks": ("smoke", "checks", [], "failed: no checks"),
    "failed-but-all-passed": ("smoke", "passed", False, "key 'passed' is False"),
    "skipped-and-passed": (
        "smoke",
        "checks",
        [{"name": "health", "passed": True, "seconds": 0.1, "skipped": True}],
        "key 'checks'",
    ),
    "smoke-digest": ("smoke", "digest", "sha256:zz", "key 'digest'"),
    "smoke-image": ("smoke", "image", "not a reference", "key 'image'"),
    "smoke-image-line-break": ("smoke", "image", f"{IMAGE}:1\nRUN x", "key 'image'"),
    "smoke-tag-line-break": ("smoke", "image", f"{IMAGE}:1\n", "key 'image'"),
    "smoke-tier": ("smoke", "tier", "../gpu", "key 'tier'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_record_beyond_its_schema_is_refused_in_one_line(
    case: str, reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kind, key, value, words = BAD[case]
    path = reports / f"{kind}-cpu-amd64.json"
    # The same project unspoilt passes the loaders: the refusal comes from the spoiling alone.
    assert load_build_records(reports) and load_smoke_records(reports)
    spoil(path, key, value)
    code = cli.main(["publish", "--dry-run", "--no-sign"])
    out, err = capsys.readouterr()
    assert code == 15, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and words in err, err
    assert out == ""


def test_an_sbom_linked_out_of_the_reports_directory_is_refused(
    reports: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the public")
    sbom = reports / "sbom-cpu-amd64.cdx.json"
    sbom.unlink()
    sbom.symlink_to(secret)
    code = cli.main(["publish", "--dry-run", "--no-sign"])
    err = capsys.readouterr().err
    assert code == 15 and "build-cpu-amd64.json: key 'sbom'" in err and "link" in err, err


@pytest.mark.parametrize(
    "text",
    [b"[" * 100_000 + b"]" * 100_000, b'{"schema": 1, "digest": ' + b"[" * 50_000, b"\xff\xfe"],
    ids=["deep", "deep-unclosed", "not-utf8"],
)
def test_a_record_that_is_no_json_is_one_line(
    text: bytes, reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (reports / "smoke-cpu-amd64.json").write_bytes(text)
    code = cli.main(["publish", "--dry-run", "--no-sign"])
    err = capsys.readouterr().err
    assert code == 15 and err.count("\n") == 1 and "smoke-cpu-amd64.json" in err, err


def test_what_the_pipeline_writes_its_loaders_read(reports: Path) -> None:
    """The writers and the loaders agree: a smoke run whose checks all passed, or one that
    failed, and every output's build record, round-trip."""
    outputs: dict[str, Callable[[BuildRecord], dict[str, Any]]] = {
        "load": lambda b: {"ref": f"{IMAGE}:{VERSION}-cpu-amd64"},
        "push": lambda b: {"ref": f"{IMAGE}@{DIGEST}"},
        "oci": lambda b: {"ref": f"oci-archive:/tmp/cpu.tar@{DIGEST}"},
    }
    for output, changes in outputs.items():
        record = good_build()
        written = BuildRecord(**{**vars(record), "output": output, **changes(record)})
        write_record(reports, written)
        assert load_build_records(reports) == [written]
    failed = SmokeRecord(
        **{**vars(good_smoke()), "passed": False, "checks": (CheckResult("health", False, 0.1),)}
    )
    write_record(reports, failed)
    assert load_smoke_records(reports) == [failed]
