"""`nox -s sync` and `nox -s bump`: the pinned llama.cpp source as a verified vendor snapshot.

sync: shallow-fetch exactly the pinned commit (GitPython) into a staging directory beside
third_party/llama.cpp/vendor, check out, verify HEAD, drop .git, prune (pipeline/prune.yaml),
hash, write snapshot.json, then swap it in with renames. Interrupts (Ctrl-C, SIGTERM) leave
the previous snapshot untouched; a run killed outright (SIGKILL) is repaired by the next one.
bump: move version.json's pin to a ref on the remote; does not sync.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from pipeline import console
from pipeline.config import (
    LlamaCppPin,
    Project,
    load_version,
    save_version,
    write_json_atomic,
)
from pipeline.errors import RemoteError, SnapshotError, ToolMissingError, UsageError
from pipeline.snapshot import (
    PruneRules,
    Snapshot,
    check_snapshot,
    content_digest,
    load_prune_rules,
    load_snapshot,
    manifest,
    read_snapshot_file,
    verify_tree,
    walk_tree,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from pipeline.cli import Command

__all__ = [
    "COMMANDS",
    "Snapshot",
    "bump",
    "check_snapshot",
    "load_snapshot",
    "resolve_remote",
    "sync",
]

REMOTE_ENV = "LLAMA_CPP_REMOTE"
# Test hook: pause (sleep) at a named phase so tests can interrupt or kill a sync right there.
PAUSE_ENV = "PIPELINE_SYNC_PAUSE_AT"
PAUSE_SECONDS_ENV = "PIPELINE_SYNC_PAUSE_SECONDS"
STAGING_PREFIX = ".sync-"
RELEASE_TAG = re.compile(r"^b(\d+)$")
_MB = 1_000_000

# Never prompt for credentials (CI would hang); English messages so errors can be classified.
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}
_MISSING_OBJECT = re.compile(
    r"not our ref|couldn't find remote ref|no such remote ref|unadvertised object|"
    r"not a valid object|reference is not a tree|bad object",
    re.IGNORECASE,
)
_NOT_A_REPO = re.compile(
    r"does not appear to be a git repository|not a git repository|repository .*not found",
    re.IGNORECASE,
)
_PROGRESS_LINE = re.compile(
    r"^(?P<label>[A-Za-z][A-Za-z ]+):\s+(?P<pct>\d+)% \((?P<cur>\d+)/(?P<total>\d+)\)"
)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


# --------------------------------------------------------------------------- small helpers


def redact(text: str) -> str:
    """Drop `user:token@` from URLs: credentials never reach a log line."""
    return _USERINFO.sub("", text)


def resolve_remote(cli_remote: str | None, pin: LlamaCppPin) -> str:
    """--remote, then $LLAMA_CPP_REMOTE, then version.json's repository."""
    env_remote = os.environ.get(REMOTE_ENV, "")
    for candidate in (cli_remote, env_remote):
        if candidate and candidate.strip():
            remote = candidate.strip()
            break
    else:
        remote = pin.repository
    if remote.startswith("-"):
        raise UsageError(f"remote {remote!r} looks like an option, not a URL")
    return remote


def _pause(phase: str) -> None:
    if os.environ.get(PAUSE_ENV) == phase:
        print(f"sync: paused at {phase}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get(PAUSE_SECONDS_ENV, "30")))


def _mb(n: int) -> str:
    return f"{n / _MB:.1f} MB"


def _progress() -> Progress:
    # Only on a terminal: in logs and pipes the summary line says it all. Imported here to
    # keep the no-op sync fast.
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console.err,
        transient=True,
        disable=not console.err.is_terminal,
    )


def _advancer(progress: Progress, task: TaskID) -> Callable[[int], None]:
    return lambda n: progress.advance(task, n)


def _git() -> ModuleType:
    """GitPython, imported only when needed: it fails at import time without a git binary."""
    if shutil.which("git") is None:
        raise ToolMissingError(
            "git is not installed or not on PATH", "install git (e.g. apt-get install git)"
        )
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import git

    return git


def _git_detail(stderr: str) -> str:
    lines = [redact(line.strip()) for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
    # The first fatal line says what happened; later ones are generic advice.
    detail = (fatal or lines[-1:] or ["no message"])[0]
    return re.sub(r"^(fatal|error):\s*", "", detail)


def _local_path(remote: str) -> Path | None:
    if remote.startswith("file://"):
        return Path(remote.removeprefix("file://"))
    if "://" not in remote and ":" not in remote.split("/")[0]:
        return Path(remote)
    return None


def _remote_error(remote: str, stderr: str, commit: str | None = None) -> RemoteError:
    shown = redact(remote)
    detail = _git_detail(stderr)
    mirror_hint = "check the URL, or point --remote URL / $LLAMA_CPP_REMOTE at a reachable mirror"
    local = _local_path(remote)
    if local is not None and not local.exists():
        return RemoteError(f"remote {shown} does not exist", mirror_hint)
    if commit and _MISSING_OBJECT.search(stderr):
        return RemoteError(
            f"remote {shown} does not have commit {commit}",
            "check llama_cpp.commit in version.json, or use a remote that has it",
        )
    if _NOT_A_REPO.search(stderr):
        return RemoteError(f"remote {shown} is not a git repository (git: {detail})", mirror_hint)
    return RemoteError(f"cannot reach remote {shown} (git: {detail})", mirror_hint)


def _run_git(
    git: ModuleType,
    cwd: Path,
    args: Sequence[str],
    progress: Progress,
    label: str,
    on_error: Callable[[str], Exception],
    pause_phase: str | None = None,
) -> None:
    """Run a long git command, feeding its --progress output to a progress bar.

    git runs in its own session so a terminal's Ctrl-C reaches only us; whatever stops us,
    the finally clause kills git before the caller deletes the directory it writes into.
    """
    handle = git.Git(str(cwd)).execute(
        ["git", *args], as_process=True, with_stdout=False, env=_GIT_ENV, start_new_session=True
    )
    proc = handle.proc
    task = progress.add_task(label, total=None)
    captured: list[str] = []
    try:
        if pause_phase:
            _pause(pause_phase)
        buffer = b""
        while chunk := proc.stderr.read1(65536):
            buffer += chunk
            *lines, buffer = re.split(rb"[\r\n]", buffer)
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                captured.append(line)
                match = _PROGRESS_LINE.match(line)
                if match:
                    progress.update(
                        task,
                        description=f"{label}: {match['label'].lower()}",
                        completed=int(match["cur"]),
                        total=int(match["total"]),
                    )
        captured.append(buffer.decode("utf-8", "replace"))
        status = proc.wait()
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        progress.remove_task(task)
    if status != 0:
        raise on_error("\n".join(captured[-50:]))


def _kill_group(proc: Any) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- atomicity


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One sync at a time per checkout: an advisory lock on the directory (no lock file; the
    kernel drops it when its holder dies). A second sync waits, then usually finds the
    snapshot it wanted already there."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.err.print(f"waiting for another sync of {directory} to finish", soft_wrap=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM across the renames that swap the snapshot, then deliver them.

    Python runs signal handlers in the main thread between bytecodes; recording the signal
    instead makes the three renames one step: an interrupt lands before or after, never
    between. (pthread_sigmask would not do: other threads could still take the signal.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[signal.Signals] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


def _swap(project: Project, staging: Path) -> None:
    """Rename the staged vendor + snapshot.json into place, keeping the old vendor in
    `staging/old-vendor` (deleted with the staging directory afterwards).

    Recovery after SIGKILL (`_recover_stale`) reads the step reached from what is where:
    `staging/snapshot.json` present and `staging/vendor` gone means the new vendor is in
    place but the metadata is not.
    """
    vendor, old = project.vendor_dir, staging / "old-vendor"
    with _signals_deferred():
        had_old = vendor.exists()
        if had_old:
            vendor.rename(old)
        _pause("swap-old-moved")
        try:
            (staging / "vendor").rename(vendor)
        except OSError:
            if had_old:
                old.rename(vendor)
            raise
        _pause("swap-new-moved")
        try:
            os.replace(staging / "snapshot.json", project.snapshot_file)
        except OSError:
            vendor.rename(staging / "vendor")
            if had_old:
                old.rename(vendor)
            raise
    _pause("committed")


def _recover_stale(project: Project) -> None:
    """Undo or finish what a killed sync left (we hold the lock: no sync is running)."""
    vendor = project.vendor_dir
    for staging in sorted(project.third_party.glob(STAGING_PREFIX + "*")):
        old, staged_vendor = staging / "old-vendor", staging / "vendor"
        swapped_in = (staging / "snapshot.json").exists() and not staged_vendor.exists()
        if old.exists() and not vendor.exists():  # killed between the first two renames
            old.rename(vendor)
        elif swapped_in and vendor.exists():  # new vendor in place, metadata not: undo
            vendor.rename(staged_vendor)
            if old.exists():
                old.rename(vendor)
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _third_party_dir(project: Project) -> Iterator[Path]:
    """third_party/llama.cpp, created if needed and removed again if a failed first sync
    leaves it empty (bad input must not leave anything behind)."""
    created = [p for p in (project.third_party.parent, project.third_party) if not p.exists()]
    project.third_party.mkdir(parents=True, exist_ok=True)
    try:
        yield project.third_party
    except BaseException:
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                break
        raise


# --------------------------------------------------------------------------- sync


def _existing(project: Project, progress: Progress) -> Snapshot | None:
    """The current snapshot if the vendor directory is one of ours and intact; None if there
    is none. A directory we cannot prove to be ours is never deleted."""
    vendor = project.vendor_dir
    if not vendor.exists() and not vendor.is_symlink():
        return None
    shown = vendor.relative_to(project.root)
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
    diff = verify_tree(vendor, snapshot, _advancer(progress, task))
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
) -> Snapshot:
    """Fetch, check out and verify the pin in `dest`, drop .git, prune, hash."""
    git.Repo.init(dest, mkdir=True)
    _run_git(
        git,
        dest,
        ["fetch", "--depth", "1", "--no-tags", "--progress", remote, pin.commit],
        progress,
        f"fetching {pin.short}",
        lambda stderr: _remote_error(remote, stderr, pin.commit),
        pause_phase="fetch",
    )
    _pause("checkout")
    _run_git(
        git,
        dest,
        ["-c", "advice.detachedHead=false", "checkout", "--progress", "--detach", pin.commit],
        progress,
        "checking out",
        lambda stderr: SnapshotError(f"git checkout of {pin.short} failed: {_git_detail(stderr)}"),
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

    _pause("prune")
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

    _pause("digest")
    kept_bytes = sum(e.size for e in kept)
    task = progress.add_task("hashing", total=kept_bytes)
    files = manifest(kept, _advancer(progress, task))
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


def _summary(snapshot: Snapshot) -> str:
    ref = f"{snapshot.ref}, " if snapshot.ref else ""
    return (
        f"llama.cpp {snapshot.short} ({ref}{snapshot.commit_date[:10]}): "
        f"{snapshot.file_count} files, {_mb(snapshot.total_bytes)} kept / "
        f"{_mb(snapshot.upstream_bytes)} total"
    )


def sync(project: Project, remote: str | None = None, prune: bool = True) -> Snapshot:
    """Make third_party/llama.cpp/vendor the (pruned) tree of the pinned commit.

    A no-op (no git, no network) when the snapshot there matches the pin and verifies.
    """
    started = time.monotonic()
    pin = load_version(project.version_file).llama_cpp
    rules = load_prune_rules() if prune else None
    url = resolve_remote(remote, pin)
    try:
        snapshot, fetched = _sync(project, pin, rules, url)
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
    project: Project, pin: LlamaCppPin, rules: PruneRules | None, url: str
) -> tuple[Snapshot, bool]:
    with _third_party_dir(project) as third_party, _locked(third_party), _progress() as progress:
        _recover_stale(project)
        _pause("start")
        current = _existing(project, progress)
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

        git = _git()
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=third_party))
        try:
            snapshot = _fetch_into(git, url, pin, rules, staging / "vendor", progress)
            write_json_atomic(staging / "snapshot.json", snapshot.to_json())
            _pause("staged")
            _swap(project, staging)
        except git.GitError as exc:  # a git step other than fetch/checkout (init, rev-parse)
            raise SnapshotError(f"git failed in {staging.name}: {exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return snapshot, True


# --------------------------------------------------------------------------- bump


def _ls_remote(git: ModuleType, remote: str) -> dict[str, str]:
    """`{ref name: commit}`; annotated tags resolved to the commit they point at."""
    status, output, stderr = git.Git().execute(
        ["git", "ls-remote", remote],
        env=_GIT_ENV,
        with_exceptions=False,
        with_extended_output=True,
    )
    if status != 0:
        raise _remote_error(remote, str(stderr))
    refs: dict[str, str] = {}
    for line in str(output).splitlines():
        sha, _, name = line.partition("\t")
        if name.endswith("^{}"):
            refs[name[:-3]] = sha  # the peeled value wins over the tag object's own sha
        else:
            refs.setdefault(name, sha)
    return refs


def _release_tags(refs: dict[str, str]) -> list[tuple[int, str]]:
    """(number, name) of every `b<number>` tag, newest (highest number) first."""
    found = []
    for name in refs:
        if name.startswith("refs/tags/"):
            match = RELEASE_TAG.match(name.removeprefix("refs/tags/"))
            if match:
                found.append((int(match.group(1)), name.removeprefix("refs/tags/")))
    return sorted(found, reverse=True)


def _resolve(git: ModuleType, remote: str, ref: str | None) -> tuple[str, str | None]:
    refs = _ls_remote(git, remote)
    shown = redact(remote)
    if ref is None:
        tags = _release_tags(refs)
        if not tags:
            raise RemoteError(
                f"remote {shown} has no release tags (b<number>)",
                "name one: nox -s bump -- <tag|branch|sha>",
            )
        name = tags[0][1]
        return refs[f"refs/tags/{name}"], name
    if re.fullmatch(r"[0-9a-fA-F]{40}", ref):
        commit = ref.lower()
        with tempfile.TemporaryDirectory(prefix="pipeline-bump-") as tmp:
            git.Repo.init(tmp)
            with _progress() as progress:
                _run_git(
                    git,
                    Path(tmp),
                    ["fetch", "--depth", "1", "--no-tags", "--filter=tree:0", remote, commit],
                    progress,
                    f"checking {commit[:7]}",
                    lambda stderr: _remote_error(remote, stderr, commit),
                )
        matching = [n for _, n in _release_tags(refs) if refs[f"refs/tags/{n}"] == commit]
        return commit, (matching[0] if matching else None)
    candidates = [ref] if ref.startswith("refs/") else [f"refs/tags/{ref}", f"refs/heads/{ref}"]
    for candidate in candidates:
        if candidate in refs:
            return refs[candidate], ref
    raise RemoteError(
        f"ref {ref!r} not found on remote {shown}",
        "give a tag, a branch or a full 40-hex sha that the remote has (see git ls-remote)",
    )


def _pin_label(commit: str, ref: str | None) -> str:
    return f"{commit[:7]} ({ref or 'no ref'})"


def bump(project: Project, ref: str | None = None, remote: str | None = None) -> tuple[str, str]:
    """Point version.json at REF on the remote (default: the newest b<number> tag).

    Returns (old commit, new commit). Does not sync.
    """
    info = load_version(project.version_file)
    old = info.llama_cpp
    url = resolve_remote(remote, old)
    commit, new_ref = _resolve(_git(), url, ref)
    if (commit, new_ref) != (old.commit, old.ref):
        save_version(
            project.version_file,
            replace(info, llama_cpp=LlamaCppPin(old.repository, commit, new_ref)),
        )
    console.out.print(
        f"llama.cpp pin: {_pin_label(old.commit, old.ref)} -> {_pin_label(commit, new_ref)}",
        soft_wrap=True,
    )
    if commit != old.commit:
        console.err.print("version.json updated; run nox -s sync to fetch it", soft_wrap=True)
    return old.commit, commit


# --------------------------------------------------------------------------- CLI


def _sync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--remote",
        metavar="URL",
        help=f"fetch from this mirror (default: ${REMOTE_ENV}, then version.json's repository)",
    )
    parser.add_argument("--no-prune", action="store_true", help="keep the whole upstream tree")
    parser.add_argument(
        "--check",
        action="store_true",
        help="verify the existing snapshot against snapshot.json and the pin (offline)",
    )


def _sync_command(args: argparse.Namespace) -> int:
    project = Project.discover()
    if not args.check:
        sync(project, args.remote, prune=not args.no_prune)
        return 0
    if args.remote or args.no_prune:
        raise UsageError("--check takes no other option", "run 'pipeline sync --check' alone")
    started = time.monotonic()
    total = load_snapshot(project).total_bytes
    with _progress() as progress:
        task = progress.add_task("verifying snapshot", total=total)
        snapshot = check_snapshot(project, _advancer(progress, task))
    console.out.print(
        f"snapshot OK: {_summary(snapshot)}; verified in {time.monotonic() - started:.2f} s",
        soft_wrap=True,
    )
    return 0


def _bump_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ref", nargs="?", metavar="REF", help="tag, branch or sha (default: newest b<number> tag)"
    )
    parser.add_argument(
        "--remote",
        metavar="URL",
        help=f"resolve REF on this mirror (default: ${REMOTE_ENV}, then version.json's repository)",
    )


def _bump_command(args: argparse.Namespace) -> int:
    bump(Project.discover(), args.ref, args.remote)
    return 0


COMMANDS: list[Command] = [
    (
        "sync",
        "Fetch the pinned llama.cpp commit into third_party/llama.cpp/vendor",
        _sync_arguments,
        _sync_command,
    ),
    (
        "bump",
        "Move version.json's llama.cpp pin to a ref on the remote (does not sync)",
        _bump_arguments,
        _bump_command,
    ),
]
