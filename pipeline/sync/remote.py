"""git against the upstream remote: fetch and checkout with progress, ls-remote, ref resolution,
and git's failures turned into one clear RemoteError.

git runs in a session of its own so a terminal's Ctrl-C reaches only the pipeline; whatever
stops us, the git process group is stopped before its directory is deleted. Credentials in a
URL (`user:token@`) never reach a message.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.core import console
from pipeline.core.errors import RemoteError, ToolMissingError
from pipeline.core.process import stop_group

if TYPE_CHECKING:
    from rich.progress import Progress

RELEASE_TAG = re.compile(r"^b(\d+)$")
# Never prompt for credentials (CI would hang); English messages so errors can be classified.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}
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


def redact(text: str) -> str:
    """Drop `user:token@` from URLs: credentials never reach a log line."""
    return _USERINFO.sub("", text)


def gitpython() -> ModuleType:
    """GitPython, imported only when needed: it fails at import time without a git binary."""
    if shutil.which("git") is None:
        raise ToolMissingError(
            "git is not installed or not on PATH", "install git (e.g. apt-get install git)"
        )
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import git

    return git


def git_detail(stderr: str) -> str:
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


def remote_error(remote: str, stderr: str, commit: str | None = None) -> RemoteError:
    shown = redact(remote)
    detail = git_detail(stderr)
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


def run_git(
    git: ModuleType,
    cwd: Path,
    args: Sequence[str],
    progress: Progress,
    label: str,
    on_error: Callable[[str], Exception],
    started: Callable[[], None] = lambda: None,
) -> None:
    """Run a long git command, feeding its --progress output to a progress bar; `started` is
    called once git runs (where an interrupt must stop it, not orphan it)."""
    handle = git.Git(str(cwd)).execute(
        ["git", *args], as_process=True, with_stdout=False, env=GIT_ENV, start_new_session=True
    )
    proc = handle.proc
    task = progress.add_task(label, total=None)
    captured: list[str] = []
    try:
        started()
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
        stop_group(proc, grace=5.0)
        progress.remove_task(task)
    if status != 0:
        raise on_error("\n".join(captured[-50:]))


def ls_remote(git: ModuleType, remote: str) -> dict[str, str]:
    """`{ref name: commit}`; annotated tags resolved to the commit they point at."""
    status, output, stderr = git.Git().execute(
        ["git", "ls-remote", remote],
        env=GIT_ENV,
        with_exceptions=False,
        with_extended_output=True,
    )
    if status != 0:
        raise remote_error(remote, str(stderr))
    refs: dict[str, str] = {}
    for line in str(output).splitlines():
        sha, _, name = line.partition("\t")
        if name.endswith("^{}"):
            refs[name[:-3]] = sha  # the peeled value wins over the tag object's own sha
        else:
            refs.setdefault(name, sha)
    return refs


def release_tags(refs: dict[str, str]) -> list[tuple[int, str]]:
    """(number, name) of every `b<number>` tag, newest (highest number) first."""
    found = []
    for name in refs:
        if name.startswith("refs/tags/"):
            match = RELEASE_TAG.match(name.removeprefix("refs/tags/"))
            if match:
                found.append((int(match.group(1)), name.removeprefix("refs/tags/")))
    return sorted(found, reverse=True)


def resolve_ref(git: ModuleType, remote: str, ref: str | None) -> tuple[str, str | None]:
    """(commit, ref name to record) for REF on the remote; None: its newest release tag."""
    refs = ls_remote(git, remote)
    shown = redact(remote)
    if ref is None:
        tags = release_tags(refs)
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
            with console.progress() as progress:
                run_git(
                    git,
                    Path(tmp),
                    ["fetch", "--depth", "1", "--no-tags", "--filter=tree:0", remote, commit],
                    progress,
                    f"checking {commit[:7]}",
                    lambda stderr: remote_error(remote, stderr, commit),
                )
        matching = [n for _, n in release_tags(refs) if refs[f"refs/tags/{n}"] == commit]
        return commit, (matching[0] if matching else None)
    candidates = [ref] if ref.startswith("refs/") else [f"refs/tags/{ref}", f"refs/heads/{ref}"]
    for candidate in candidates:
        if candidate in refs:
            return refs[candidate], ref
    raise RemoteError(
        f"ref {ref!r} not found on remote {shown}",
        "give a tag, a branch or a full 40-hex sha that the remote has (see git ls-remote)",
    )
