"""`--backend auto`: which backend a local build is for, from the GPUs this host shows.

The rules are data (host-backends.yaml); this reads a root directory (the host's `/`,
or a prepared tree) and says which rule matched and on what evidence, or what it looked for.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.datafile import load_yaml
from pipeline.core.errors import ConfigError
from pipeline.core.fields import Fields
from pipeline.matrix import Matrix

RULES_FILE = Path(__file__).with_name("host-backends.yaml")
_KEYS = {"backend", "paths", "commands", "drivers", "cuda"}
_DRIVER_VERSION = re.compile(r"Kernel Module[^0-9]*([0-9][0-9.]*)")


@dataclass(frozen=True)
class Rule:
    backend: str
    paths: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    drivers: tuple[str, ...] = ()
    cuda: bool = False


@dataclass(frozen=True)
class Detection:
    backend: str
    evidence: str  # what was found, or for the fallback what was looked for and not found

    def line(self) -> str:
        return f"backend auto: {self.backend} ({self.evidence})"


def load_rules(path: Path = RULES_FILE) -> tuple[Rule, ...]:
    top = Fields({"rules": load_yaml(path)}, path.name)
    rules = []
    for spec in top.items("rules", "rule"):
        spec.no_unknown(_KEYS)
        rules.append(
            Rule(
                spec.text("backend"),
                spec.strings("paths", default=()),
                spec.strings("commands", default=()),
                spec.strings("drivers", default=()),
                spec.boolean("cuda", default=False),
            )
        )
    if rules[-1].paths or rules[-1].commands:
        top.fail("the last rule is the fallback: a backend and nothing else")
    return tuple(rules)


def _render_driver(root: Path, node: Path) -> str | None:
    link = root / "sys" / "class" / "drm" / node.name / "device" / "driver"
    try:
        return Path(os.readlink(link)).name
    except OSError:
        return None


def _found(rule: Rule, root: Path, search_path: str) -> list[str]:
    """What of the rule's evidence this root shows, as the host would name it."""
    found = []
    for pattern in rule.paths:
        for node in sorted(root.glob(pattern)):
            if rule.drivers:
                driver = _render_driver(root, node)
                if driver not in rule.drivers:
                    continue
                found.append(f"/{node.relative_to(root)} (driver {driver})")
            else:
                found.append(f"/{node.relative_to(root)}")
    for command in rule.commands:
        for directory in filter(None, search_path.split(os.pathsep)):
            candidate = root / directory.lstrip("/") / command
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found.append(f"{command} at {directory.rstrip('/')}/{command}")
                break
    return found


def _looked_for(rule: Rule) -> str:
    items = [
        f"/{p}" + (f" with a driver of {', '.join(rule.drivers)}" if rule.drivers else "")
        for p in rule.paths
    ]
    items += [f"{c} on PATH" for c in rule.commands]
    return " or ".join(items)


def nvidia_driver(root: Path) -> str | None:
    try:
        text = (root / "proc" / "driver" / "nvidia" / "version").read_text()
    except OSError:
        return None
    match = _DRIVER_VERSION.search(text)
    return match.group(1) if match else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _cuda_backend(matrix: Matrix, root: Path) -> tuple[str, str]:
    """The newest CUDA backend the host's driver runs; the oldest-driver one when unknown."""
    cuda = sorted(
        (b for b in matrix.backends.values() if b.cuda),
        key=lambda b: _version(b.cuda.min_driver),  # type: ignore[union-attr]
    )
    if not cuda:
        raise ConfigError("matrix.yaml has no CUDA backend for an NVIDIA GPU")
    driver = nvidia_driver(root)
    if driver is None:
        return cuda[0].name, "driver version unknown: the backend for the oldest drivers"
    runs = [b for b in cuda if _version(driver) >= _version(b.cuda.min_driver)]  # type: ignore[union-attr]
    chosen = runs[-1] if runs else cuda[0]
    return chosen.name, f"driver {driver}"


def detect_backend(
    matrix: Matrix, root: Path = Path("/"), search_path: str | None = None
) -> Detection:
    """The first rule whose evidence `root` shows; the fallback says what was not found."""
    search = os.environ.get("PATH", "") if search_path is None else search_path
    rules = load_rules()
    absent = []
    for rule in rules[:-1]:
        found = _found(rule, root, search)
        if not found:
            absent.append(_looked_for(rule))
            continue
        backend, detail = _cuda_backend(matrix, root) if rule.cuda else (rule.backend, "")
        evidence = ", ".join(found) + (f"; {detail}" if detail else "")
        return Detection(matrix.backend(backend).name, evidence)
    fallback = matrix.backend(rules[-1].backend).name
    return Detection(fallback, "no GPU found: no " + "; no ".join(absent))
