"""One exception type per kind of failure; the CLI maps each to an exit code and one line.

Nothing below the CLI prints errors: it raises one of these, with a message saying what was
wrong and a hint saying what to do. The CLI prints `error: <message> (<hint>)` and exits.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every expected failure. Never shown with a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        # One line, always: multi-line messages from tools are folded.
        return " ".join(text.split())


class UsageError(PipelineError):
    """Bad command-line arguments: unknown backend, arch, option combination."""

    exit_code = 2


class ConfigError(PipelineError):
    """version.json, the matrix or another data file is missing or malformed."""

    exit_code = 3


class ToolMissingError(PipelineError):
    """A program the stage needs (git, docker, buildx, cmake) is not installed."""

    exit_code = 4


class RemoteError(PipelineError):
    """The upstream remote is unreachable, not a git repository, or lacks the commit/ref."""

    exit_code = 5


class SnapshotError(PipelineError):
    """The vendor snapshot is missing, corrupted, or its directory is not ours to touch."""

    exit_code = 6


class BuildError(PipelineError):
    """An image build failed or its result is inconsistent."""

    exit_code = 7


class BuildTimedOut(BuildError):
    """A build ran past the time limit it was given and was stopped."""


class SmokeError(PipelineError):
    """The image under test failed a check, or could not be started."""

    exit_code = 8


class ModelError(PipelineError):
    """A model file is missing, not GGUF, or could not be downloaded."""

    exit_code = 9


class RegistryError(PipelineError):
    """The registry answered with an error or could not be reached."""

    exit_code = 10


class CredentialsError(PipelineError):
    """Registry or hub credentials are missing or were refused."""

    exit_code = 11


class PublishError(PipelineError):
    """A publish plan cannot be carried out (tag conflict, missing smoke report, ...)."""

    exit_code = 12


class DockerUnavailableError(PipelineError):
    """No Docker engine answers, or buildx is missing."""

    exit_code = 13


class VerifyError(PipelineError):
    """A published image's signature, smoke attestation or SBOM is missing or does not hold."""

    exit_code = 16


class RecordMissingError(PipelineError):
    """A stage's input record (a build or smoke report, the snapshot) does not exist yet."""

    exit_code = 14


class RecordInvalidError(PipelineError):
    """A record exists but is not one this pipeline wrote (bad JSON, schema, types)."""

    exit_code = 15


class GateError(PipelineError):
    """A promotion refused: a gate held the candidate against the stable release and failed."""

    exit_code = 17


class Interrupted(PipelineError):
    """Ctrl-C or SIGTERM: the stage cleaned up and stopped."""

    exit_code = 130
