"""`nox -s sync` and `nox -s bump`: the pinned llama.cpp source as a verified vendor snapshot.

sync: shallow-fetch exactly the pinned commit (GitPython) into a staging directory beside
third_party/llama.cpp/vendor, check out, verify HEAD, drop .git, prune (records/prune.yaml), hash,
write snapshot.json (the record build reads), then swap it in with renames. Interrupts
(Ctrl-C, SIGTERM) leave the previous snapshot untouched; a run killed outright (SIGKILL) is
repaired by the next one. bump: move version.json's pin to a ref on the remote; does not sync.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.core import console
from pipeline.core.arguments import Command
from pipeline.core.datafile import write_json_atomic
from pipeline.core.errors import SnapshotError
from pipeline.core.project import Project
from pipeline.core.version import LlamaCppPin, load_version, save_version
from pipeline.records.prune import PruneRules, load_prune_rules
from pipeline.records.snapshot import (
    Snapshot,
    check_snapshot,
    content_digest,
    load_snapshot,
    manifest,
    read_snapshot_file,
    verify_tree,
    walk_tree,
)
from pipeline.sync.options import (
    BumpOptions,
    SyncOptions,
    add_bump_arguments,
    add_sync_arguments,
    resolve_bump,
    resolve_sync,
)
from pipeline.sync.remote import git_detail, gitpython, redact, remote_error, resolve_ref, run_git
from pipeline.sync.swap import (
    STAGING_PREFIX,
    PhaseHook,
    locked,
    no_hook,
    recover_stale,
    swap,
    third_party_dir,
)

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["COMMANDS", "bump", "check", "sync"]

_MB = 1_000_000


def _mb(n: int) -> str:
    return f"{n / _MB:.1f} MB"


def _summary(snapshot: Snapshot) -> str:
    ref = f"{snapshot.ref}, " if snapshot.ref else ""
    return (
        f"llama.cpp {snapshot.short} ({ref}{snapshot.commit_date[:10]}): "
        f"{snapshot.file_count} files, {_mb(snapshot.total_bytes)} kept / "
        f"{_mb(snapshot.upstream_bytes)} total"
    )


def _existing(project: Project, progress: Progress) -> Snapshot | None:
    """The current snapshot if the vendor directory is one of ours and intact; None if there
    is none. A directory we cannot prove to be ours is never deleted."""
    vendor = project.vendor_dir
    if not vendor.exists() and not vendor.is_symlink():
        return None
    shown = project.shown(vendor)
    if vendor.is_symlink() or not vendor.is_dir():
        raise SnapshotError(
            f"{shown} is not a directory made by sync; refusing to replace it",
            "move or delete it yourself, then run nox -s sync",
        )
    if not any(vendor.iterdir()):
        vendor.rmdir()
        return None
    try:
        snapshot = read_snapshot_file(project.snapshot_file)
    except SnapshotError:
        raise SnapshotError(
            f"{shown} exists but is not a snapshot made by sync (no valid snapshot.json); "
            "refusing to delete it",
            "move or delete it yourself, then run nox -s sync",
        ) from None
    task = progress.add_task("verifying current snapshot", total=snapshot.total_bytes)
    diff = verify_tree(vendor, snapshot, lambda n: progress.advance(task, n))
    progress.remove_task(task)
    if diff:
        raise SnapshotError(
            f"{shown} has local changes ({diff.summary(limit=3)}); refusing to delete it",
            "move your changes away and delete the directory, then run nox -s sync",
        )
    return snapshot


def _fetch_into(
    git: ModuleType,
    remote: str,
    pin: LlamaCppPin,
    rules: PruneRules | None,
    dest: Path,
    progress: Progress,
    on_phase: PhaseHook,
) -> Snapshot:
    """Fetch, check out and verify the pin in `dest`, drop .git, prune, hash."""
    git.Repo.init(dest, mkdir=True)
    run_git(
        git,
        dest,
        ["fetch", "--depth", "1", "--no-tags", "--progress", remote, pin.commit],
        progress,
        f"fetching {pin.short}",
        lambda stderr: remote_error(remote, stderr, pin.commit),
        started=lambda: on_phase("fetch"),
    )
    on_phase("checkout")
    run_git(
        git,
        dest,
        ["-c", "advice.detachedHead=false", "checkout", "--progress", "--detach", pin.commit],
        progress,
        "checking out",
        lambda stderr: SnapshotError(f"git checkout of {pin.short} failed: {git_detail(stderr)}"),
    )
    repo = git.Repo(dest)
    try:  # close() stops GitPython's persistent cat-file processes before .git goes
        head = repo.head.commit
        if head.hexsha != pin.commit:
            raise SnapshotError(f"checked-out HEAD is {head.hexsha}, expected the pin {pin.commit}")
        commit_date = head.committed_datetime.isoformat()
        author = f"{head.author.name} <{head.author.email}>"
    finally:
        repo.close()
    # The build context must not carry git history: snapshot.json records what it told us.
    shutil.rmtree(dest / ".git")

    on_phase("prune")
    entries = walk_tree(dest)
    removed = [e for e in entries if rules is not None and rules.removes(e.relpath)]
    task = progress.add_task("pruning", total=len(removed))
    for entry in removed:
        os.unlink(entry.path)
        progress.advance(task)
    for directory, _dirs, _files in os.walk(dest, topdown=False):
        if directory != str(dest) and not os.listdir(directory):
            os.rmdir(directory)
    progress.remove_task(task)
    removed_set = {e.relpath for e in removed}
    kept = [e for e in entries if e.relpath not in removed_set]

    on_phase("digest")
    kept_bytes = sum(e.size for e in kept)
    task = progress.add_task("hashing", total=kept_bytes)
    files = manifest(kept, lambda n: progress.advance(task, n))
    progress.remove_task(task)
    return Snapshot(
        repository=pin.repository,
        commit=pin.commit,
        commit_date=commit_date,
        author=author,
        ref=pin.ref,
        pruned=rules is not None,
        prune_rules_digest=rules.digest if rules is not None else None,
        removed_count=len(removed),
        removed_bytes=sum(e.size for e in removed),
        file_count=len(files),
        total_bytes=kept_bytes,
        content_digest=content_digest(files),
        fetched_from=redact(remote),
        files=files,
    )


def sync(options: SyncOptions, on_phase: PhaseHook = no_hook) -> Snapshot:
    """Make third_party/llama.cpp/vendor the (pruned) tree of the pinned commit; its record.

    A no-op (no git, no network) when the snapshot there matches the pin and verifies.
    `on_phase` is told each step as it is reached (start, fetch, ..., committed).
    """
    started = time.monotonic()
    project = options.project
    pin = load_version(project.version_file).llama_cpp
    rules = load_prune_rules() if options.prune else None
    try:
        snapshot, fetched = _sync(project, pin, rules, options.remote, on_phase)
    except OSError as exc:
        raise SnapshotError(
            f"sync failed on {exc.filename or project.third_party}: {exc.strerror}",
            "fix the cause (disk space, permissions); the previous snapshot is unchanged",
        ) from None
    seconds = time.monotonic() - started
    if fetched:
        console.out.print(f"synced {_summary(snapshot)}, {seconds:.1f} s", soft_wrap=True)
    else:
        console.out.print(
            f"already synced: {_summary(snapshot)}; verified in {seconds:.2f} s, no network",
            soft_wrap=True,
        )
    return snapshot


def _sync(
    project: Project,
    pin: LlamaCppPin,
    rules: PruneRules | None,
    url: str,
    on_phase: PhaseHook,
) -> tuple[Snapshot, bool]:
    with third_party_dir(project) as third_party, locked(third_party), console.progress() as bar:
        recover_stale(project)
        on_phase("start")
        current = _existing(project, bar)
        if (
            current is not None
            and current.commit == pin.commit
            and current.pruned == (rules is not None)
            and current.prune_rules_digest == (rules.digest if rules else None)
        ):
            if (current.repository, current.ref) != (pin.repository, pin.ref):
                current = replace(current, repository=pin.repository, ref=pin.ref)
                write_json_atomic(project.snapshot_file, current.to_json())
            return current, False

        git = gitpython()
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=third_party))
        try:
            snapshot = _fetch_into(git, url, pin, rules, staging / "vendor", bar, on_phase)
            write_json_atomic(staging / "snapshot.json", snapshot.to_json())
            on_phase("staged")
            swap(project, staging, on_phase)
        except git.GitError as exc:  # a git step other than fetch/checkout (init, rev-parse)
            raise SnapshotError(f"git failed in {staging.name}: {exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return snapshot, True


def check(project: Project) -> Snapshot:
    """`sync --check`: the snapshot verified offline against snapshot.json and the pin."""
    started = time.monotonic()
    total = load_snapshot(project).total_bytes
    with console.progress() as bar:
        task = bar.add_task("verifying snapshot", total=total)
        snapshot = check_snapshot(project, lambda n: bar.advance(task, n))
    console.out.print(
        f"snapshot OK: {_summary(snapshot)}; verified in {time.monotonic() - started:.2f} s",
        soft_wrap=True,
    )
    return snapshot


# --------------------------------------------------------------------------- bump


def _pin_label(commit: str, ref: str | None) -> str:
    return f"{commit[:7]} ({ref or 'no ref'})"


def bump(options: BumpOptions) -> tuple[str, str]:
    """Point version.json at REF on the remote (default: the newest b<number> tag).

    Returns (old commit, new commit). Does not sync.
    """
    path = options.project.version_file
    info = load_version(path)
    old = info.llama_cpp
    commit, new_ref = resolve_ref(gitpython(), options.remote, options.ref)
    if (commit, new_ref) != (old.commit, old.ref):
        save_version(path, replace(info, llama_cpp=LlamaCppPin(old.repository, commit, new_ref)))
    console.out.print(
        f"llama.cpp pin: {_pin_label(old.commit, old.ref)} -> {_pin_label(commit, new_ref)}",
        soft_wrap=True,
    )
    if commit != old.commit:
        console.err.print(
            "version.json updated; run nox -s sync to fetch it (`nox -s bump` re-renders the "
            "Dockerfiles, whose defaults name the pin)",
            soft_wrap=True,
        )
    return old.commit, commit


# --------------------------------------------------------------------------- CLI


def _run_sync(args: argparse.Namespace) -> int:
    options = resolve_sync(args)
    if args.check:
        check(options.project)
    else:
        sync(options)
    return 0


def _run_bump(args: argparse.Namespace) -> int:
    bump(resolve_bump(args))
    return 0


COMMANDS = (
    Command(
        "sync",
        "Fetch the pinned llama.cpp commit into third_party/llama.cpp/vendor",
        add_sync_arguments,
        _run_sync,
    ),
    Command(
        "bump",
        "Move version.json's llama.cpp pin to a ref on the remote (does not sync)",
        add_bump_arguments,
        _run_bump,
    ),
)
