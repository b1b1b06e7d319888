"""The chain the train runs: every stage through its own command (`python -m pipeline <stage>`)
in a work root of its own, as a person or a workflow would run it, each one's whole output in
a log and its time and exit code in a `StageRun`. The train never imports a stage: what it
runs is what users run.

A stage that fails stops the chain: `StageFailed` carries its exit code (the stage's own: 7 for
a build, 8 for a smoke...) and the last lines of its log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import console
from pipeline.core.errors import PipelineError
from pipeline.core.process import stop_group
from pipeline.records.candidate import StageRun

TAIL_LINES = 15


class StageFailed(PipelineError):
    """A stage of the train failed; the train exits with that stage's own exit code."""

    def __init__(self, run: StageRun) -> None:
        super().__init__(
            f"track: {run.stage} failed (exit {run.exit_code}); nothing was published",
            f"its log: {run.log}",
        )
        self.run = run
        self.exit_code = run.exit_code


@dataclass
class Chain:
    """The stage commands of one train run, in `root` (a project of its own: version.json,
    dockerfiles/, and what the stages write under build/)."""

    root: Path
    env: Mapping[str, str]
    runs: list[StageRun] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.root / "build" / "train-logs"

    def run(self, stage: str, *args: str) -> StageRun:
        """`python -m pipeline ARGS` in the work root; its StageRun (StageFailed if it fails)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{stage.replace(' ', '-').replace('/', '-')}.log"
        env = {**self.env, "PIPELINE_ROOT": str(self.root)}
        started = time.monotonic()
        console.err.print(f"track: {stage} ...", markup=False)
        with log.open("w", encoding="utf-8") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *args],
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the train stops the stage's whole group
            )
            try:
                code = proc.wait()
            finally:
                stop_group(proc)
        seconds = round(time.monotonic() - started, 1)
        tail: tuple[str, ...] = ()
        if code != 0:
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            tail = tuple(line for line in lines[-TAIL_LINES:] if line.strip())
        done = StageRun(stage, seconds, code, str(log), tail)
        self.runs.append(done)
        console.err.print(
            f"track: {stage}: {'done' if code == 0 else f'failed (exit {code})'} in {seconds} s",
            markup=False,
        )
        if code != 0:
            for line in tail:
                console.err.print(f"  {line}", markup=False, soft_wrap=True)
            raise StageFailed(done)
        return done


def stage_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment the stages run with: this process's (credentials, the lab's mirror, the
    signing key reference), less what would point them at another project."""
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_ROOT"}
    env.update(extra)
    return env
