"""A replay of a GitHub Actions workflow on this machine, job by job: every `run:` step runs in
order as a runner runs it (`bash --noprofile --norc -eo pipefail`), with the workflow's, the
job's and the step's env, and its `${{ }}` expressions substituted from a declared context.

It is a replay, not an emulator of GitHub. What stands in for GitHub is named once, here:
- The runner is this machine. Each job gets a fresh copy of the checkout, its own venv,
  RUNNER_TEMP and DOCKER_CONFIG, and GitHub's default variables; the machine's own network
  settings (CA bundle, pip's index) stay, the lab's, the pipeline's and the developer's
  variables do not. Jobs share this machine's Docker engine and so its BuildKit cache: a warm
  runner, where GitHub's are fresh (the registry cache is exported and read all the same).
- Each `uses:` step has one local equivalent in USES.
- Expressions: paths into the context, literals, `==`/`!=` with GitHub's loose equality, `!`,
  `&&`/`||` (without parentheses), and `always()`/`success()`/`failure()`/`cancelled()`.
  Anything else fails the replay with a line saying so, so the workflow cannot outgrow its
  replay unnoticed. A job's `if:` is evaluated too (a false one: the job is `skipped`).
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / ".github" / "workflows"
EXPRESSION_RE = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
PATH_RE = re.compile(r"[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*")
COMPARISON_RE = re.compile(r"(.+?)\s*(==|!=)\s*(.+)")
# Variables of the machine that a runner would not have: the lab's, the pipeline's, signing
# and registry secrets, the developer's venv and docker config.
PRIVATE_PREFIXES = (
    "LLAMA_",
    "LAB_",
    "COSIGN_",
    "PIPELINE_",
    "REGISTRY_",
    "DOCKERHUB_",
    "HF_",
    "SMOKE_",
    "PYTEST_",
    "NOX_",
    "GITHUB_",
    "RUNNER_",
    "ACTIONS_",
)
PRIVATE_NAMES = ("DOCKER_CONFIG", "VIRTUAL_ENV", "CI")


def load_workflow(name: str) -> dict[Any, Any]:
    data: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


# ---------------------------------------------------------------------------- expressions


def _loose(value: Any) -> Any:
    """GitHub's loose equality: operands of different types compare as numbers."""
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and not value.strip():
        return 0.0  # GitHub: the empty string is 0
    try:
        return float(value)
    except ValueError:
        return float("nan")


def evaluate(expression: str, context: Mapping[str, Any], failed: bool = False) -> Any:
    expression = expression.strip()
    for operator in ("||", "&&"):  # || binds loosest
        if operator in expression:
            parts = [evaluate(p, context, failed) for p in expression.split(operator)]
            return any(parts) if operator == "||" else all(parts)
    if expression.startswith("!") and not expression.startswith("!="):
        return not evaluate(expression[1:], context, failed)
    if expression in ("true", "false"):
        return expression == "true"
    if expression == "null":
        return None
    if re.fullmatch(r"'[^']*'", expression):
        return expression[1:-1]
    if expression in ("always()", "success()", "failure()", "cancelled()"):
        status = {"always()": True, "success()": not failed, "failure()": failed}
        return status.get(expression, False)
    compared = COMPARISON_RE.fullmatch(expression)
    if compared:
        left = evaluate(compared[1], context, failed)
        right = evaluate(compared[3], context, failed)
        if type(left) is type(right) and left is not None:
            equal = left == right
        else:
            equal = _loose(left) == _loose(right)
        return equal if compared[2] == "==" else not equal
    if PATH_RE.fullmatch(expression):
        value: Any = context
        for part in expression.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return value  # a missing property is null, as on GitHub
    pytest.fail(f"the replay cannot evaluate ${{{{ {expression} }}}}: extend tests/replay.py")


def render(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def substitute(text: str, context: Mapping[str, Any]) -> str:
    return EXPRESSION_RE.sub(lambda m: render(evaluate(m[1], context)), text)


def should_run(condition: Any, context: Mapping[str, Any], failed: bool) -> bool:
    """A step's `if:`; without one, success(). A condition naming no status function still
    needs the steps before it to have passed, as on GitHub."""
    if condition is None:
        return not failed
    text = str(condition)
    inner = EXPRESSION_RE.fullmatch(text.strip())
    text = inner[1] if inner else text
    if failed and not re.search(r"\b(always|failure)\(\)", text):
        return False
    return bool(evaluate(text, context, failed))


def job_runs(spec: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
    """A job's `if:` (with the `needs` and `vars` contexts); without one, whether every job it
    needs succeeded, as on GitHub."""
    condition = spec.get("if")
    if condition is None:
        needs = context.get("needs", {})
        return all(n.get("result") == "success" for n in needs.values())
    text = str(condition).strip()
    inner = EXPRESSION_RE.fullmatch(text)
    return bool(evaluate(inner[1] if inner else text, context))


def expand_matrix(matrix: Mapping[str, Any]) -> list[dict[str, Any]]:
    """GitHub's matrix: the product of the lists, then each `include` entry merged into every
    combination whose original values it does not overwrite, or added when none takes it."""
    axes = {k: v for k, v in matrix.items() if k not in ("include", "exclude")}
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    for excluded in matrix.get("exclude", []):
        combos = [c for c in combos if any(c.get(k) != v for k, v in excluded.items())]
    for entry in matrix.get("include", []):
        merged = False
        for combo in combos:
            original = {k: combo[k] for k in axes}
            if all(original.get(k, v) == v for k, v in entry.items()):
                combo.update(entry)
                merged = True
        if not merged:
            combos.append(dict(entry))
    return combos


# --------------------------------------------------------------------------------- runner


@dataclass
class StepResult:
    name: str
    seconds: float
    output: str
    skipped: bool = False


@dataclass
class Job:
    """One job on a fresh runner: its workspace, its env, and what its steps did."""

    name: str
    spec: Mapping[str, Any]
    context: dict[str, Any]
    home: Path  # the runner: workspace, venv, RUNNER_TEMP, DOCKER_CONFIG under it
    env: dict[str, str]
    results: list[StepResult] = field(default_factory=list)
    failed: bool = False
    outputs: dict[str, str] = field(default_factory=dict)  # the job's `outputs:`, evaluated

    @property
    def workspace(self) -> Path:
        return self.home / "workspace"

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def output(self) -> str:
        return "\n".join(r.output for r in self.results)


Action = Callable[[Job, Mapping[str, str]], str]


def runner_env(
    job_home: Path, github: Mapping[str, Any], extra: Mapping[str, str]
) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(PRIVATE_PREFIXES) and name not in PRIVATE_NAMES
    }
    # Nothing of a developer's venv or of the repository's own tools on PATH.
    env["PATH"] = os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and not Path(p).resolve().is_relative_to(REPO_ROOT) and ".nox" not in p
    )
    (job_home / "temp").mkdir(parents=True, exist_ok=True)
    env |= {
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_WORKSPACE": str(job_home / "workspace"),
        "GITHUB_EVENT_NAME": str(github["event_name"]),
        "GITHUB_REF": str(github["ref"]),
        "GITHUB_REF_NAME": str(github["ref_name"]),
        "GITHUB_REF_TYPE": str(github["ref_type"]),
        "GITHUB_REPOSITORY": str(github["repository"]),
        "GITHUB_SHA": str(github["sha"]),
        "GITHUB_WORKFLOW_REF": str(github["workflow_ref"]),
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_API_URL": "https://api.github.com",
        "RUNNER_OS": "Linux",
        "RUNNER_TEMP": str(job_home / "temp"),
        # The runner's own /tmp.
        "TMPDIR": str(job_home / "temp"),
        **extra,
    }
    return env


def run_script(job: Job, script: str, env: Mapping[str, str], timeout: float) -> tuple[int, str]:
    path = job.home / "temp" / f"step-{len(job.results)}.sh"
    path.write_text(script)
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(path)],
        cwd=job.workspace,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def run_job(
    job: Job,
    workflow_env: Mapping[str, str],
    uses: Mapping[str, Action],
    timeout: float = 1800,
) -> Job:
    """Every step of the job in order; the job fails at its first failing step (later steps run
    only when their `if:` asks for always() or failure())."""
    context = job.context
    job_env = {
        **{k: substitute(render(v), context) for k, v in workflow_env.items()},
        **{k: substitute(render(v), context) for k, v in job.spec.get("env", {}).items()},
    }
    steps: dict[str, Any] = context.setdefault("steps", {})
    for index, step in enumerate(job.spec["steps"]):
        name = str(step.get("name") or step.get("uses") or f"step {index}")
        if not should_run(step.get("if"), context, job.failed):
            job.results.append(StepResult(name, 0.0, f"[{name}: skipped]", skipped=True))
            continue
        step_env = {k: substitute(render(v), context) for k, v in step.get("env", {}).items()}
        # What the step writes to $GITHUB_OUTPUT becomes steps.<id>.outputs.
        outputs_file = job.home / "temp" / f"output-{index}"
        outputs_file.write_text("")
        env = {**job.env, **job_env, **step_env, "GITHUB_OUTPUT": str(outputs_file)}
        started = time.monotonic()
        if "uses" in step:
            action = str(step["uses"]).split("@", 1)[0]
            if action not in uses:
                pytest.fail(f"the replay has no local equivalent for {action}: add one to USES")
            inputs = {k: substitute(render(v), context) for k, v in step.get("with", {}).items()}
            try:
                output, code = uses[action](job, inputs), 0
            except ReplayStepError as exc:
                output, code = str(exc), 1
        else:
            code, output = run_script(job, substitute(str(step["run"]), context), env, timeout)
        job.results.append(StepResult(name, time.monotonic() - started, f"[{name}]\n{output}"))
        if "id" in step:
            steps[str(step["id"])] = {"outputs": read_outputs(outputs_file)}
        if code != 0:
            job.failed = True
    job.outputs = {k: substitute(str(v), context) for k, v in job.spec.get("outputs", {}).items()}
    return job


def read_outputs(path: Path) -> dict[str, str]:
    """$GITHUB_OUTPUT's `name=value` lines (and `name<<DELIMITER` blocks), as the runner reads
    them."""
    outputs: dict[str, str] = {}
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            key, _, delimiter = line.partition("<<")
            block = []
            for inner in lines:
                if inner == delimiter:
                    break
                block.append(inner)
            outputs[key] = "\n".join(block)
        elif "=" in line:
            key, _, value = line.partition("=")
            outputs[key] = value
    return outputs


class ReplayStepError(Exception):
    """A `uses:` step's local equivalent failed (as the action would have)."""


# ------------------------------------------------------------------ the uses: equivalents


def checkout(job: Job, inputs: Mapping[str, str]) -> str:
    """actions/checkout -> the files git knows of this checkout (tracked, and untracked ones
    not ignored: a developer's uncommitted work is what is replayed), copied into a fresh
    workspace. No credentials are left behind (persist-credentials: false)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    count = 0
    for relative in filter(None, listed.split("\0")):
        source = REPO_ROOT / relative
        if source.is_file():
            target = job.workspace / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            count += 1
    # A repository at one commit holding those files, as the action leaves one (at the run's
    # commit, with history as deep as fetch-depth: 1).
    git = ["git", "-C", str(job.workspace), "-c", "user.name=replay", "-c", "user.email=r@x"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run(
        [*git, "commit", "-q", "-m", f"the run's commit {job.env['GITHUB_SHA']}"], check=True
    )
    return f"checked out {count} files into {job.workspace}"


def setup_python(job: Job, inputs: Mapping[str, str]) -> str:
    """actions/setup-python -> a fresh venv of this machine's python<version>, first on PATH."""
    version = inputs.get("python-version", "3")
    interpreter = shutil.which(f"python{version}", path=job.env["PATH"])
    if interpreter is None:
        raise ReplayStepError(f"python{version} is not on this machine")
    venv = job.home / "python"
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, capture_output=True)
    job.env["PATH"] = f"{venv / 'bin'}{os.pathsep}{job.env['PATH']}"
    return f"python {version}: {venv}"


def setup_buildx(job: Job, inputs: Mapping[str, str]) -> str:
    """docker/setup-buildx-action -> the lab's builder (the docker driver, containerd store)."""
    return "the lab's default builder"


def use_docker_config(job: Job) -> Path:
    """The job's own DOCKER_CONFIG, with this machine's CLI plugins (buildx, compose)."""
    config = job.home / "docker"
    plugins = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "cli-plugins"
    (config / "cli-plugins").mkdir(parents=True, exist_ok=True)
    for plugin in plugins.glob("docker-*") if plugins.is_dir() else []:
        link = config / "cli-plugins" / plugin.name
        if not link.exists():
            link.symlink_to(plugin.resolve())
    job.env["DOCKER_CONFIG"] = str(config)
    return config


def docker_login(registry_for: Callable[[str], str]) -> Action:
    """docker/login-action -> `docker login` (password on stdin) into the job's DOCKER_CONFIG;
    `registry_for` maps the registry the workflow names (docker.io when none) to a local one."""

    def login(job: Job, inputs: Mapping[str, str]) -> str:
        use_docker_config(job)
        registry = registry_for(inputs.get("registry") or "docker.io")
        result = subprocess.run(
            ["docker", "login", registry, "--username", inputs["username"], "--password-stdin"],
            input=inputs["password"],
            env=job.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ReplayStepError(f"docker login {registry}: {result.stderr.strip()}")
        return f"logged in to {registry}"

    return login


def lab_cosign(job: Job, inputs: Mapping[str, str]) -> str:
    """sigstore/cosign-installer -> the lab's cosign (Debian sid's package), which must be the
    release the workflow installs."""
    versions = Path(os.environ.get("LLAMA_LAB", "/opt/llama-lab")) / "sid" / ".versions"
    installed = next(
        (
            line.split()[1]
            for line in versions.read_text().splitlines()
            if line.startswith("cosign ")
        ),
        "",
    )
    wanted = inputs.get("cosign-release", "").removeprefix("v")
    if not installed.startswith(f"{wanted}-"):
        raise ReplayStepError(f"the lab's cosign is {installed}, the workflow installs {wanted}")
    if shutil.which("cosign", path=job.env["PATH"]) is None:
        raise ReplayStepError("cosign is not on PATH")
    return f"cosign {installed}"


def upload_artifact(store: Path) -> Action:
    """actions/upload-artifact -> a directory per artifact name under `store`, files kept
    relative to the paths' common parent (as the action does)."""

    def upload(job: Job, inputs: Mapping[str, str]) -> str:
        paths = [job.workspace / p.strip() for p in inputs["path"].splitlines() if p.strip()]
        found = [p for p in paths if p.is_file()]
        # A directory: every file in it, named relative to it (one directory) or to the paths'
        # common parent (several).
        found += [f for p in paths if p.is_dir() for f in sorted(p.rglob("*")) if f.is_file()]
        given = [p for p in paths if p.is_file() or p.is_dir()]
        if len(given) < len(paths) and inputs.get("if-no-files-found", "warn") == "error":
            missing = ", ".join(str(p.relative_to(job.workspace)) for p in paths if p not in given)
            raise ReplayStepError(f"no file at {missing}")
        if not found:
            return "no files to upload"
        if len(given) == 1 and given[0].is_dir():
            root = given[0]
        else:
            root = Path(os.path.commonpath([p.parent for p in found]))
        target = store / inputs["name"]
        if target.exists():
            raise ReplayStepError(f"an artifact named {inputs['name']} exists already")
        for path in found:
            destination = target / path.relative_to(root)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
        return f"uploaded {len(found)} files as {inputs['name']}"

    return upload


def download_artifact(store: Path) -> Action:
    """actions/download-artifact -> every artifact matching `pattern` from `store` into
    `path` (merged when merge-multiple, else one directory per artifact)."""

    def download(job: Job, inputs: Mapping[str, str]) -> str:
        target = job.workspace / inputs.get("path", ".")
        if "name" in inputs:  # one artifact, its files straight into `path`
            if not (store / inputs["name"]).is_dir():
                raise ReplayStepError(f"no artifact named {inputs['name']}")
            shutil.copytree(store / inputs["name"], target, dirs_exist_ok=True)
            return f"downloaded {inputs['name']}"
        names = sorted(
            d.name
            for d in store.iterdir()
            if d.is_dir() and fnmatch.fnmatch(d.name, inputs.get("pattern", "*"))
        )
        for name in names:
            into = target if inputs.get("merge-multiple") == "true" else target / name
            shutil.copytree(store / name, into, dirs_exist_ok=True)
        return f"downloaded {', '.join(names) or 'nothing'}"

    return download


def actions_cache(store: Path) -> tuple[Action, Action]:
    """actions/cache/restore and actions/cache/save -> directories under `store`, one per key:
    restore takes the exact key, else the newest key starting with a restore-keys prefix (a
    miss is not a failure); save keeps the first entry of a key (GitHub refuses to overwrite)."""

    def restore(job: Job, inputs: Mapping[str, str]) -> str:
        store.mkdir(parents=True, exist_ok=True)
        key = inputs["key"]
        prefixes = [p.strip() for p in inputs.get("restore-keys", "").splitlines() if p.strip()]
        found = store / key if (store / key).is_dir() else None
        if found is None:
            candidates = [d for d in store.iterdir() if any(d.name.startswith(p) for p in prefixes)]
            found = max(candidates, key=lambda d: d.stat().st_mtime, default=None)
        if found is None:
            return f"cache not found for {key}"
        shutil.copytree(found, job.workspace / inputs["path"], symlinks=True, dirs_exist_ok=True)
        return f"restored {found.name}"

    def save(job: Job, inputs: Mapping[str, str]) -> str:
        key, path = inputs["key"], job.workspace / inputs["path"]
        if (store / key).exists():
            return f"a cache {key} exists already: not saved"
        if not path.is_dir():
            raise ReplayStepError(f"path {inputs['path']} does not exist: nothing to save")
        # actions/cache archives with tar: a symlink is kept as a link, never followed.
        shutil.copytree(path, store / key, symlinks=True)
        return f"saved {key}"

    return restore, save


def failure_report(job: Job) -> str:
    return f"job {job.name} failed:\n{job.output()[-6000:]}"


def job_figures(jobs: list[Job]) -> str:
    return ", ".join(f"{job.name} {job.seconds:.0f} s" for job in jobs)


def jobs_in_order(workflow: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Jobs in an order that respects `needs` (the file's order where it does)."""
    done: set[str] = set()
    pending = dict(workflow["jobs"])
    while pending:
        for name, spec in list(pending.items()):
            needs = spec.get("needs", [])
            needs = [needs] if isinstance(needs, str) else needs
            if set(needs) <= done:
                yield name, spec
                done.add(name)
                del pending[name]
                break
        else:
            pytest.fail(f"jobs {sorted(pending)} need jobs that never run")
