"""nox -s sync / bump against real git repositories (tests/fixtures/git.py: fake_upstream) and,
when the lab provides it, the real upstream llama.cpp mirror."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from fixtures.git_repos import (
    FAKE_KEPT_FILES,
    FAKE_PRUNED_FILES,
    FAKE_SYMLINK,
    FakeUpstream,
    build_fake_upstream,
    git_run,
    write_version_json,
)
from fixtures.interrupt import sigint_as_from_a_terminal
from fixtures.lab import PINNED_COMMIT, REPO_ROOT, require_lab

from pipeline import sync as sync_stage
from pipeline.core.arguments import resolve_remote
from pipeline.core.errors import ConfigError, RemoteError, SnapshotError, ToolMissingError
from pipeline.core.project import Project
from pipeline.core.version import load_version
from pipeline.records.prune import (
    PRUNE_RULES_FILE,
    PruneRules,
    glob_to_regex,
    load_prune_rules,
    parse_prune_rules,
)
from pipeline.records.snapshot import (
    Snapshot,
    check_snapshot,
    load_snapshot,
)
from pipeline.sync.options import BumpOptions, SyncOptions

# Every test here names its remote; the lab env's LLAMA_CPP_REMOTE must not leak in.
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("clean_env")]

UNREACHABLE = "http://127.0.0.1:9/llama.cpp.git"


# --------------------------------------------------------------------------- helpers


def unused_rules(rules: PruneRules, relpaths: list[str]) -> list[str]:
    """Patterns that match none of `relpaths` (stale rules after an upstream move)."""
    return [
        pattern
        for pattern in (*rules.remove, *rules.keep)
        if not any(glob_to_regex(pattern).match(p) for p in relpaths)
    ]


def sync(project: Project, remote: str | None = None, prune: bool = True) -> Snapshot:
    """The sync stage with its options resolved as the CLI resolves them (--remote, then
    $LLAMA_CPP_REMOTE, then version.json's repository)."""
    repository = load_version(project.version_file).llama_cpp.repository
    return sync_stage.sync(SyncOptions(project, resolve_remote(remote, repository), prune))


def bump(project: Project, ref: str | None = None, remote: str | None = None) -> tuple[str, str]:
    repository = load_version(project.version_file).llama_cpp.repository
    return sync_stage.bump(BumpOptions(project, resolve_remote(remote, repository), ref))


def run_cli(
    root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=root,
        env=cli_env(root, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"LLAMA_CPP_REMOTE", "PIPELINE_ROOT"}}
    env["PIPELINE_ROOT"] = str(root)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra or {})
    return env


def assert_one_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """Non-zero exit, exactly one `error:` line on stderr, no traceback; returns the line."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "stderr:" not in errors[0]  # git's message, not GitPython's wrapping of it
    return errors[0]


def tree_state(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under `path` (directories too) with its mode and content: byte-identical
    means equal states."""
    state: dict[str, tuple[int, bytes]] = {}
    if not path.exists():
        return state
    for entry in sorted(path.rglob("*")):
        st = entry.lstat()
        if entry.is_symlink():
            content = os.readlink(entry).encode()
        elif entry.is_dir():
            content = b""
        else:
            content = entry.read_bytes()
        state[str(entry.relative_to(path))] = (st.st_mode, content)
    return state


def staging_dirs(root: Path) -> list[Path]:
    third_party = root / "third_party" / "llama.cpp"
    return sorted(third_party.glob(".sync-*")) if third_party.exists() else []


def snapshot_dir(root: Path) -> Path:
    return root / "third_party" / "llama.cpp"


def upstream_sizes(upstream: FakeUpstream, label: str) -> dict[str, int]:
    """Path -> size at a commit, as git stores it (a symlink's size is its target's length)."""
    listing = git_run(upstream.path, "ls-tree", "-r", "-l", upstream.commits[label])
    sizes = {}
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        sizes[path] = int(meta.split()[3])
    return sizes


def set_pin(root: Path, upstream: FakeUpstream, label: str, ref: str | None = None) -> None:
    write_version_json(root, upstream.commits[label], ref, upstream.url)


# --------------------------------------------------------------------------- sync


def test_sync_fetches_the_pin_prunes_and_records_it(
    fake_project: Path, fake_upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = sync(Project(fake_project))

    vendor = fake_project / "third_party" / "llama.cpp" / "vendor"
    kept = {str(p.relative_to(vendor)) for p in vendor.rglob("*") if not p.is_dir()}
    assert kept == {*FAKE_KEPT_FILES, FAKE_SYMLINK[0]}
    assert not (vendor / ".git").exists()
    assert (vendor / "src" / "llama.cpp").read_text() == "// llama, revision 2\n"
    assert (vendor / "LICENSE").is_file()
    assert os.access(vendor / "build-info.sh", os.X_OK)
    assert os.readlink(vendor / FAKE_SYMLINK[0]) == FAKE_SYMLINK[1]
    assert not (vendor / "docs").exists() and not (vendor / "models" / "templates").exists()

    assert snapshot.commit == fake_upstream.commits["c2"]
    assert snapshot.repository == fake_upstream.url
    assert snapshot.ref == "b1000" and snapshot.build_number == 1000
    assert snapshot.commit_date == fake_upstream.dates["c2"]
    assert snapshot.source_date_epoch == int(
        datetime.fromisoformat(fake_upstream.dates["c2"]).timestamp()
    )
    assert snapshot.author == "Upstream Dev <dev@upstream.example>"
    assert snapshot.pruned
    rules_bytes = PRUNE_RULES_FILE.read_bytes()
    assert snapshot.prune_rules_digest == "sha256:" + hashlib.sha256(rules_bytes).hexdigest()
    sizes = upstream_sizes(fake_upstream, "c2")
    assert snapshot.removed_count == len(FAKE_PRUNED_FILES)
    assert snapshot.removed_bytes == sum(sizes[p] for p in FAKE_PRUNED_FILES)
    assert snapshot.file_count == len(kept)
    assert snapshot.total_bytes == sum(sizes[p] for p in kept)
    assert snapshot.upstream_bytes == sum(sizes.values())

    # The digest, recomputed independently from the documented algorithm.
    lines = []
    for rel in sorted(kept):
        path = vendor / rel
        if path.is_symlink():
            kind, data = "link", os.readlink(path).encode()
        else:
            kind, data = ("exec" if os.access(path, os.X_OK) else "file"), path.read_bytes()
        lines.append(f"{kind} {hashlib.sha256(data).hexdigest()} {rel}\n")
    assert (
        snapshot.content_digest == "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()
    )

    recorded = json.loads((snapshot_dir(fake_project) / "snapshot.json").read_text())
    assert recorded == snapshot.to_json()
    assert load_snapshot(Project(fake_project)) == snapshot
    assert staging_dirs(fake_project) == []
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1
    assert f"synced llama.cpp {snapshot.short}" in summary
    assert f"{snapshot.file_count} files" in summary and "MB kept /" in summary


def test_no_prune_keeps_the_whole_tree(fake_project: Path, fake_upstream: FakeUpstream) -> None:
    snapshot = sync(Project(fake_project), prune=False)
    vendor = fake_project / "third_party" / "llama.cpp" / "vendor"
    tracked = git_run(fake_upstream.path, "ls-tree", "-r", "--name-only", "b1000").splitlines()
    files = {str(p.relative_to(vendor)) for p in vendor.rglob("*") if not p.is_dir()}
    assert files == set(tracked)
    assert not snapshot.pruned and snapshot.prune_rules_digest is None
    assert snapshot.removed_count == 0 and snapshot.removed_bytes == 0
    assert snapshot.file_count == len(tracked)


def test_resync_is_a_noop_without_network(
    fake_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(fake_project)
    first = sync(project)
    before = tree_state(snapshot_dir(fake_project))
    inode = project.vendor_dir.stat().st_ino
    capsys.readouterr()

    # An unreachable remote proves no network is touched.
    again = sync(project, remote=UNREACHABLE)
    assert again == first
    assert tree_state(snapshot_dir(fake_project)) == before
    assert project.vendor_dir.stat().st_ino == inode
    out = capsys.readouterr().out
    assert "already synced" in out and "no network" in out

    result = run_cli(fake_project, "sync", env={"LLAMA_CPP_REMOTE": UNREACHABLE})
    assert result.returncode == 0, result.stderr
    assert "already synced" in result.stdout and result.stderr == ""


def test_resync_without_git_on_path_is_still_a_noop(fake_project: Path, tmp_path: Path) -> None:
    sync(Project(fake_project))
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_cli(fake_project, "sync", env={"PATH": str(empty)})
    assert result.returncode == 0, result.stderr
    assert "already synced" in result.stdout


def test_ref_only_change_updates_metadata_without_fetching(
    fake_project: Path, fake_upstream: FakeUpstream
) -> None:
    project = Project(fake_project)
    sync(project)
    vendor_before = tree_state(project.vendor_dir)
    set_pin(fake_project, fake_upstream, "c2", ref="release-branch")
    snapshot = sync(project, remote=UNREACHABLE)
    assert snapshot.ref == "release-branch"
    assert load_snapshot(project).ref == "release-branch"
    assert tree_state(project.vendor_dir) == vendor_before


def test_a_new_pin_or_prune_setting_replaces_the_snapshot(
    fake_project: Path, fake_upstream: FakeUpstream
) -> None:
    project = Project(fake_project)
    sync(project)
    set_pin(fake_project, fake_upstream, "c3", ref="b999")
    snapshot = sync(project)
    assert snapshot.commit == fake_upstream.commits["c3"]
    assert (project.vendor_dir / "src" / "llama.cpp").read_text() == "// llama, revision 3\n"
    assert check_snapshot(project) == snapshot

    full = sync(project, prune=False)
    assert (project.vendor_dir / "docs" / "build.md").is_file()
    assert check_snapshot(project) == full
    pruned = sync(project)
    assert not (project.vendor_dir / "docs").exists()
    assert pruned.content_digest == snapshot.content_digest
    assert staging_dirs(fake_project) == []


def test_snapshot_json_is_reproducible(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    texts = []
    for name in ("one", "two"):
        root = tmp_path / name
        root.mkdir()
        write_version_json(root, fake_upstream.commits["c2"], "b1000", fake_upstream.url)
        sync(Project(root))
        texts.append((snapshot_dir(root) / "snapshot.json").read_bytes())
    assert texts[0] == texts[1]


def test_remote_precedence(
    fake_project: Path, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--remote, then $LLAMA_CPP_REMOTE, then version.json's repository."""
    write_version_json(fake_project, fake_upstream.commits["c2"], "b1000", UNREACHABLE)
    monkeypatch.setenv("LLAMA_CPP_REMOTE", fake_upstream.url)
    snapshot = sync(Project(fake_project))
    assert snapshot.repository == UNREACHABLE  # the upstream URL stays what version.json says
    assert snapshot.fetched_from == fake_upstream.url

    monkeypatch.setenv("LLAMA_CPP_REMOTE", UNREACHABLE)
    set_pin(fake_project, fake_upstream, "c3")
    with pytest.raises(RemoteError):
        sync(Project(fake_project))
    assert (
        sync(Project(fake_project), remote=fake_upstream.url).commit
        == (fake_upstream.commits["c3"])
    )


def test_credentials_in_a_remote_url_are_never_printed(fake_project: Path) -> None:
    result = run_cli(
        fake_project, "sync", "--remote", "http://robot:s3cr3t-t0ken@127.0.0.1:9/llama.cpp.git"
    )
    line = assert_one_error(result, RemoteError.exit_code)
    assert "s3cr3t" not in result.stderr + result.stdout
    assert "127.0.0.1:9" in line


def test_a_second_sync_waits_for_the_first(fake_project: Path) -> None:
    sync(Project(fake_project))
    fd = os.open(snapshot_dir(fake_project), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running sync holds it
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "sync"],
            cwd=fake_project,
            env=cli_env(fake_project),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("waiting for another sync of")
        time.sleep(0.5)
        assert proc.poll() is None
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "already synced" in out


# --------------------------------------------------------------------------- --check


def test_check_passes_on_an_intact_snapshot(fake_project: Path) -> None:
    sync(Project(fake_project))
    result = run_cli(fake_project, "sync", "--check", env={"LLAMA_CPP_REMOTE": UNREACHABLE})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("snapshot OK: llama.cpp")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("modify", "modified: src/llama.cpp"),
        ("add", "added: tools/server/extra.cpp"),
        ("delete", "deleted: LICENSE"),
        ("chmod", "modified: build-info.sh"),
        ("all", "modified: src/llama.cpp; added: tools/server/extra.cpp; deleted: LICENSE"),
    ],
)
def test_check_reports_changed_files_by_path(
    fake_project: Path, change: str, expected: str
) -> None:
    sync(Project(fake_project))
    vendor = snapshot_dir(fake_project) / "vendor"
    if change in ("modify", "all"):
        (vendor / "src" / "llama.cpp").write_text("// patched\n")
    if change in ("add", "all"):
        (vendor / "tools" / "server" / "extra.cpp").write_text("// new\n")
    if change in ("delete", "all"):
        (vendor / "LICENSE").unlink()
    if change == "chmod":
        (vendor / "build-info.sh").chmod(0o644)
    before = tree_state(snapshot_dir(fake_project))
    result = run_cli(fake_project, "sync", "--check")
    line = assert_one_error(result, SnapshotError.exit_code)
    assert expected in line
    assert tree_state(snapshot_dir(fake_project)) == before


def test_check_without_a_snapshot_says_to_sync(fake_project: Path) -> None:
    line = assert_one_error(run_cli(fake_project, "sync", "--check"), SnapshotError.exit_code)
    assert "nox -s sync" in line
    assert not (fake_project / "third_party").exists()


def test_check_fails_when_the_pin_moved(fake_project: Path, fake_upstream: FakeUpstream) -> None:
    sync(Project(fake_project))
    set_pin(fake_project, fake_upstream, "c3")
    line = assert_one_error(run_cli(fake_project, "sync", "--check"), SnapshotError.exit_code)
    c2, c3 = fake_upstream.commits["c2"][:7], fake_upstream.commits["c3"][:7]
    assert f"at {c2} but version.json pins {c3}" in line


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: "{not json",
        lambda d: json.dumps({**d, "schema": 99}),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "commit"}),
        lambda d: json.dumps({**d, "file_count": True}),
        lambda d: json.dumps({**d, "commit_date": "yesterday"}),
        lambda d: json.dumps({**d, "files": {**d["files"], "LICENSE": "file 00"}}),
    ],
    ids=["not-json", "schema", "missing-key", "bool-count", "bad-date", "files-vs-digest"],
)
def test_malformed_snapshot_json_is_reported(fake_project: Path, corrupt: object) -> None:
    sync(Project(fake_project))
    meta = snapshot_dir(fake_project) / "snapshot.json"
    meta.write_text(corrupt(json.loads(meta.read_text())))  # type: ignore[operator]
    line = assert_one_error(run_cli(fake_project, "sync", "--check"), SnapshotError.exit_code)
    assert "snapshot.json" in line and "nox -s sync" in line
    with pytest.raises(SnapshotError):
        load_snapshot(Project(fake_project))


@pytest.mark.parametrize(
    "data", [b"\xff\xfe not utf-8", b"[" * 100_000 + b"]" * 100_000], ids=["bytes", "deep"]
)
def test_a_snapshot_json_that_is_no_text_is_one_line(fake_project: Path, data: bytes) -> None:
    sync(Project(fake_project))
    (snapshot_dir(fake_project) / "snapshot.json").write_bytes(data)
    line = assert_one_error(run_cli(fake_project, "sync", "--check"), SnapshotError.exit_code)
    assert "snapshot.json" in line and "nox -s sync" in line


def test_check_takes_no_other_option(fake_project: Path) -> None:
    assert_one_error(run_cli(fake_project, "sync", "--check", "--no-prune"), 2)


def test_check_notices_changed_prune_rules(fake_project: Path) -> None:
    project = Project(fake_project)
    sync(project)
    other = PruneRules.from_patterns(["docs/"], [], "sha256:" + "0" * 64)
    with pytest.raises(SnapshotError, match=r"prune\.yaml changed"):
        check_snapshot(project, rules=other)


# --------------------------------------------------------------------------- bad input


def _commit_missing(root: Path, up: FakeUpstream) -> None:
    write_version_json(root, "1" * 40, None, up.url)


def _remote_nonexistent(root: Path, up: FakeUpstream) -> None:
    write_version_json(root, up.commits["c2"], None, "file:///nonexistent/llama.cpp")


def _remote_refused(root: Path, up: FakeUpstream) -> None:
    write_version_json(root, up.commits["c2"], None, UNREACHABLE)


def _remote_plain_dir(root: Path, up: FakeUpstream) -> None:
    plain = root.parent / "plain-directory"
    plain.mkdir()
    (plain / "README").write_text("not a repository\n")
    write_version_json(root, up.commits["c2"], None, f"file://{plain}")


def _not_hex(root: Path, up: FakeUpstream) -> None:
    write_version_json(root, up.commits["c2"][:12], None, up.url)


def _malformed_json(root: Path, up: FakeUpstream) -> None:
    (root / "version.json").write_text('{"version": "0.1.0", "llama_cpp": {')


def _missing_json(root: Path, up: FakeUpstream) -> None:
    (root / "version.json").unlink()


@pytest.mark.parametrize(
    ("setup", "exit_code", "words"),
    [
        (_missing_json, ConfigError.exit_code, "no version.json"),
        (_malformed_json, ConfigError.exit_code, "not valid JSON"),
        (_not_hex, ConfigError.exit_code, "'commit'"),
        (_commit_missing, RemoteError.exit_code, "does not have commit " + "1" * 40),
        (_remote_nonexistent, RemoteError.exit_code, "does not exist"),
        (_remote_refused, RemoteError.exit_code, "cannot reach remote"),
        (_remote_plain_dir, RemoteError.exit_code, "not a git repository"),
    ],
    ids=["missing", "malformed", "not-40-hex", "commit-missing", "nonexistent", "refused", "plain"],
)
def test_bad_input_fails_cleanly_and_writes_nothing(
    fake_project: Path, fake_upstream: FakeUpstream, setup: object, exit_code: int, words: str
) -> None:
    setup(fake_project, fake_upstream)  # type: ignore[operator]
    before = tree_state(fake_project)
    line = assert_one_error(run_cli(fake_project, "sync"), exit_code)
    assert words in line
    assert tree_state(fake_project) == before
    assert not (fake_project / "third_party").exists()


def test_no_git_on_path(fake_project: Path, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_cli(fake_project, "sync", env={"PATH": str(empty)})
    assert "git is not installed" in assert_one_error(result, ToolMissingError.exit_code)
    assert not (fake_project / "third_party").exists()
    result = run_cli(fake_project, "bump", env={"PATH": str(empty)})
    assert_one_error(result, ToolMissingError.exit_code)


def test_a_failed_sync_keeps_the_previous_snapshot(
    fake_project: Path, fake_upstream: FakeUpstream
) -> None:
    sync(Project(fake_project))
    before = tree_state(snapshot_dir(fake_project))
    write_version_json(fake_project, "2" * 40, None, fake_upstream.url)
    assert_one_error(run_cli(fake_project, "sync"), RemoteError.exit_code)
    assert tree_state(snapshot_dir(fake_project)) == before


@pytest.mark.parametrize("kind", ["user-files", "local-change", "a-file", "symlink"])
def test_refuses_to_delete_a_vendor_dir_that_is_not_an_intact_snapshot(
    fake_project: Path, fake_upstream: FakeUpstream, tmp_path: Path, kind: str
) -> None:
    vendor = snapshot_dir(fake_project) / "vendor"
    if kind == "user-files":
        vendor.mkdir(parents=True)
        (vendor / "my-notes.txt").write_text("precious\n")
    elif kind == "local-change":
        sync(Project(fake_project))
        (vendor / "src" / "llama.cpp").write_text("// my patch\n")
        set_pin(fake_project, fake_upstream, "c3")
    elif kind == "a-file":
        vendor.parent.mkdir(parents=True)
        vendor.write_text("a file\n")
    else:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "file").write_text("x\n")
        vendor.parent.mkdir(parents=True)
        vendor.symlink_to(elsewhere)
    before = tree_state(snapshot_dir(fake_project))
    line = assert_one_error(run_cli(fake_project, "sync"), SnapshotError.exit_code)
    assert "third_party/llama.cpp/vendor" in line and "refusing" in line
    assert tree_state(snapshot_dir(fake_project)) == before


def test_an_empty_vendor_dir_is_simply_replaced(fake_project: Path) -> None:
    (snapshot_dir(fake_project) / "vendor").mkdir(parents=True)
    assert sync(Project(fake_project)).file_count > 0


# --------------------------------------------------------------------------- interrupts


@pytest.fixture
def synced_then_moved(fake_project: Path, fake_upstream: FakeUpstream) -> Iterator[Path]:
    """A project with a snapshot at c2 whose version.json now pins c3."""
    sync(Project(fake_project))
    set_pin(fake_project, fake_upstream, "c3", ref="b999")
    yield fake_project


PAUSED_SYNC = Path(__file__).parent / "fixtures" / "paused_sync.py"


def start_paused(
    root: Path, phase: str, seconds: float = 30, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`pipeline sync` in a process of its own, paused at `phase` by an injected callback."""
    proc = subprocess.Popen(
        [sys.executable, str(PAUSED_SYNC), phase, str(seconds)],
        cwd=root,
        env=cli_env(root, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_from_a_terminal,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.strip() == f"sync: paused at {phase}", line + proc.stderr.read()
    return proc


PRE_COMMIT_PHASES = ["start", "fetch", "checkout", "prune", "digest", "staged"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", PRE_COMMIT_PHASES)
def test_interrupt_leaves_the_previous_snapshot_exactly(
    synced_then_moved: Path, phase: str, sig: signal.Signals
) -> None:
    root = synced_then_moved
    before = tree_state(snapshot_dir(root))
    proc = start_paused(root, phase)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert tree_state(snapshot_dir(root)) == before
    assert staging_dirs(root) == []


@pytest.mark.parametrize("phase", ["swap-old-moved", "swap-new-moved"])
def test_interrupt_during_the_swap_is_deferred_until_it_completes(
    synced_then_moved: Path, fake_upstream: FakeUpstream, phase: str
) -> None:
    root = synced_then_moved
    proc = start_paused(root, phase, seconds=1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    # The swap finished as one step: the new snapshot is complete and consistent.
    assert check_snapshot(Project(root)).commit == fake_upstream.commits["c3"]
    assert staging_dirs(root) == []


@pytest.mark.parametrize(
    "phase", [*PRE_COMMIT_PHASES, "swap-old-moved", "swap-new-moved", "committed"]
)
def test_a_killed_sync_is_repaired_by_the_next_one(
    synced_then_moved: Path, fake_upstream: FakeUpstream, phase: str
) -> None:
    root = synced_then_moved
    set_pin(root, fake_upstream, "c2", ref="b1000")
    before = tree_state(snapshot_dir(root))
    set_pin(root, fake_upstream, "c3", ref="b999")
    proc = start_paused(root, phase)
    proc.kill()
    proc.communicate(timeout=30)
    time.sleep(0.2)  # a fetch that outlived its parent finishes writing into staging
    assert staging_dirs(root) != [] or phase == "start"

    committed = phase == "committed"
    if not committed:  # back to the old pin: the repaired old snapshot must simply verify
        set_pin(root, fake_upstream, "c2", ref="b1000")
    result = run_cli(root, "sync", env={"LLAMA_CPP_REMOTE": UNREACHABLE})
    assert result.returncode == 0, result.stderr
    assert "already synced" in result.stdout
    assert staging_dirs(root) == []
    if not committed:
        assert tree_state(snapshot_dir(root)) == before
    else:
        assert load_snapshot(Project(root)).commit == fake_upstream.commits["c3"]


# --------------------------------------------------------------------------- bump


def test_bump_without_ref_picks_the_highest_release_number(
    fake_project: Path, fake_upstream: FakeUpstream
) -> None:
    write_version_json(
        fake_project, fake_upstream.commits["c1"], "b998", fake_upstream.url, extra_key=[1, 2]
    )
    result = run_cli(fake_project, "bump")
    assert result.returncode == 0, result.stderr
    c1, c2 = fake_upstream.commits["c1"], fake_upstream.commits["c2"]
    assert result.stdout.strip() == f"llama.cpp pin: {c1[:7]} (b998) -> {c2[:7]} (b1000)"
    info = load_version(fake_project / "version.json")
    assert (info.llama_cpp.commit, info.llama_cpp.ref) == (c2, "b1000")
    assert info.llama_cpp.repository == fake_upstream.url
    assert info.extra == {"extra_key": [1, 2]}
    assert not (fake_project / "third_party").exists()  # bump does not sync


@pytest.mark.parametrize(
    ("ref", "label", "recorded"),
    [
        ("b999", "c3", "b999"),  # annotated tag: the commit it points at
        ("b998", "c1", "b998"),  # lightweight tag
        ("feature", "c3", "feature"),  # branch
        ("master", "c4", "master"),
        ("refs/tags/v1.0", "c3", "refs/tags/v1.0"),
        ("c4", "c4", None),  # a sha without a release tag
        ("c3", "c3", "b999"),  # a sha that a release tag names
    ],
)
def test_bump_to_a_ref(
    fake_project: Path, fake_upstream: FakeUpstream, ref: str, label: str, recorded: str | None
) -> None:
    if ref in fake_upstream.commits:
        ref = fake_upstream.commits[ref]
    old, new = bump(Project(fake_project), ref)
    assert (old, new) == (fake_upstream.commits["c2"], fake_upstream.commits[label])
    pin = load_version(fake_project / "version.json").llama_cpp
    assert (pin.commit, pin.ref) == (new, recorded)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["no-such-tag"], "ref 'no-such-tag' not found"),
        (["3" * 40], "does not have commit " + "3" * 40),
        (["--remote", UNREACHABLE], "cannot reach remote"),
        (["--remote", "file:///nonexistent/llama.cpp", "b999"], "does not exist"),
    ],
)
def test_bump_bad_input_leaves_version_json_alone(
    fake_project: Path, args: list[str], words: str
) -> None:
    before = (fake_project / "version.json").read_bytes()
    line = assert_one_error(run_cli(fake_project, "bump", *args), RemoteError.exit_code)
    assert words in line
    assert (fake_project / "version.json").read_bytes() == before


def test_bump_without_release_tags(tmp_path: Path, clean_env: None) -> None:
    upstream = build_fake_upstream(tmp_path / "up")
    for tag in upstream.tags:
        git_run(upstream.path, "tag", "-d", tag)
    root = tmp_path / "project"
    root.mkdir()
    write_version_json(root, upstream.commits["c1"], None, upstream.url)
    with pytest.raises(RemoteError, match="no release tags"):
        bump(Project(root), None)


def test_bump_uses_the_remote_precedence(
    fake_project: Path, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_version_json(fake_project, fake_upstream.commits["c2"], None, UNREACHABLE)
    monkeypatch.setenv("LLAMA_CPP_REMOTE", fake_upstream.url)
    assert bump(Project(fake_project), "b999")[1] == fake_upstream.commits["c3"]
    monkeypatch.setenv("LLAMA_CPP_REMOTE", UNREACHABLE)
    with pytest.raises(RemoteError):
        bump(Project(fake_project), "b999")
    assert bump(Project(fake_project), "b998", fake_upstream.url)[1] == fake_upstream.commits["c1"]


# --------------------------------------------------------------------------- prune rules


@pytest.mark.parametrize(
    ("pattern", "path", "removed"),
    [
        ("docs/", "docs/a.md", True),
        ("docs/", "docs/ops/deep/b.bin", True),
        ("docs/", "docs", False),  # a trailing slash matches directories only
        ("docs/", "src/docs/a.md", False),  # anchored at the root
        ("docs", "docs/a.md", True),
        ("Makefile", "Makefile", True),
        ("Makefile", "src/Makefile", False),
        ("convert_*.py", "convert_hf_to_gguf.py", True),
        ("convert_*.py", "tools/convert_x.py", False),
        ("examples/*.py", "examples/a/b.py", False),  # * stays in one segment
        ("examples/**/*.py", "examples/a/b/c.py", True),
        ("examples/**/*.py", "examples/c.py", True),  # ** may be empty
        ("tools/mtmd/test-?.jpeg", "tools/mtmd/test-1.jpeg", True),
        ("a.b", "axb", False),  # dots are literal
    ],
)
def test_glob_semantics(pattern: str, path: str, removed: bool) -> None:
    assert PruneRules.from_patterns([pattern], [], "x").removes(path) is removed


def test_keep_wins_over_remove() -> None:
    rules = PruneRules.from_patterns(["models/", "scripts/"], ["models/keep-*.gguf"], "x")
    assert rules.removes("models/other.gguf")
    assert not rules.removes("models/keep-me.gguf")
    assert unused_rules(rules, ["models/a", "models/keep-1.gguf"]) == ["scripts/"]
    from_generator = PruneRules.from_patterns((p for p in ["docs/"]), iter([]), "x")
    assert from_generator.remove == ("docs/",) and from_generator.removes("docs/a")


@pytest.mark.parametrize(
    "data",
    [
        ["docs/"],
        {"remove": "docs/"},
        {"remove": ["docs/"], "keep": None},
        {"remove": ["/etc/"]},
        {"remove": ["../outside/"]},
        {"remove": [""]},
        {"remove": [3]},
        {"remove": ["docs/"], "drop": []},
        {"keep": ["LICENSE"]},
    ],
)
def test_malformed_prune_rules(data: object) -> None:
    with pytest.raises(ConfigError):
        parse_prune_rules(data, "x")


def test_the_shipped_prune_rules() -> None:
    rules = load_prune_rules()
    assert rules.digest == "sha256:" + hashlib.sha256(PRUNE_RULES_FILE.read_bytes()).hexdigest()
    for kept in ("LICENSE", "CMakeLists.txt", "tools/server/server.cpp", "ggml/src/ggml.c"):
        assert not rules.removes(kept), kept
    for removed in ("docs/build.md", "models/ggml-vocab-gemma-4.gguf", ".github/x.yml"):
        assert rules.removes(removed), removed


def test_malformed_prune_yaml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "prune.yaml"
    bad.write_text("remove: [docs/\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_prune_rules(bad)


def test_commands_are_registered() -> None:
    names = [command.name for command in sync_stage.COMMANDS]
    assert names == ["sync", "bump"]


# --------------------------------------------------------------------------- real upstream


@pytest.fixture(scope="session")
def real_snapshot(
    upstream_mirror: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Project, float]:
    """The pinned upstream commit synced (pruned) from the lab's mirror into a temp project."""
    root = tmp_path_factory.mktemp("real-project")
    shutil.copy(REPO_ROOT / "version.json", root / "version.json")
    started = time.monotonic()
    sync(Project(root), remote=f"file://{upstream_mirror}")
    return Project(root), time.monotonic() - started


def test_real_upstream_pruned_snapshot(real_snapshot: tuple[Project, float]) -> None:
    project, seconds = real_snapshot
    snapshot = check_snapshot(project)
    assert snapshot.commit == PINNED_COMMIT
    assert snapshot.commit_date.startswith("2026-10-01")
    assert snapshot.author and "<" in snapshot.author
    assert not (project.vendor_dir / ".git").exists()
    ratio = snapshot.total_bytes / snapshot.upstream_bytes
    assert ratio <= 0.25, f"kept {ratio:.1%} of upstream"
    print(
        f"cold sync {seconds:.1f} s; kept {snapshot.total_bytes / 1e6:.1f} MB / "
        f"{snapshot.upstream_bytes / 1e6:.1f} MB ({ratio:.1%})"
    )


def test_pruned_upstream_still_configures_llama_server(
    real_snapshot: tuple[Project, float], tmp_path: Path
) -> None:
    tools = all(shutil.which(t) for t in ("cmake", "cc", "c++"))
    require_lab(tools, "cmake and a C/C++ compiler")
    project, _ = real_snapshot
    build = tmp_path / "build"
    # Ask CMake's file API for the code model: it lists the targets the configure created.
    query = build / ".cmake" / "api" / "v1" / "query"
    query.mkdir(parents=True)
    (query / "codemodel-v2").touch()
    result = subprocess.run(
        [
            "cmake",
            "-S",
            str(project.vendor_dir),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DGGML_NATIVE=OFF",
            "-DLLAMA_OPENSSL=OFF",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CMake Error" not in result.stderr
    reply = build / ".cmake" / "api" / "v1" / "reply"
    index = json.loads(next(reply.glob("index-*.json")).read_text())
    codemodel = json.loads((reply / index["reply"]["codemodel-v2"]["jsonFile"]).read_text())
    targets = {t["name"] for t in codemodel["configurations"][0]["targets"]}
    assert {"llama-server", "llama", "ggml", "llama-ui"} <= targets
    assert check_snapshot(project).commit == PINNED_COMMIT  # configure wrote nothing there


def test_every_prune_rule_matches_upstream(upstream_mirror: Path) -> None:
    """Rules that match nothing are stale (upstream moved something): review them."""
    paths = git_run(upstream_mirror, "ls-tree", "-r", "--name-only", PINNED_COMMIT).splitlines()
    assert unused_rules(load_prune_rules(), paths) == []


def test_interrupting_a_real_fetch_kills_git_and_cleans_up(
    upstream_mirror: Path, tmp_path: Path, clean_env: None
) -> None:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO_ROOT / "version.json", root / "version.json")
    proc = start_paused(root, "fetch", 0, {"LLAMA_CPP_REMOTE": f"file://{upstream_mirror}"})
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    time.sleep(3)  # a surviving git would keep writing into its staging directory
    assert not (root / "third_party").exists()
