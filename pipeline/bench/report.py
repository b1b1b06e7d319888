"""The benchmark's report: figures, goals, and their renderings (JSON, Markdown, chart, README).

Pure functions over plain records, so the maths and formatting are tested without Docker. The
measuring lives in the parts (pipeline/bench/parts/); they hand `Metric` rows here.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import ConfigError

REPORT_SCHEMA = 1
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
Op = Literal["<=", "<", ">=", ">"]
OPS: dict[str, str] = {"<=": "≤", "<": "<", ">=": "≥", ">": ">"}


# ------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Figure:
    """One measured quantity: its repeats (one value when a run is too long to repeat), or a
    note alone when it could not be measured (e.g. "did not finish in 15 min")."""

    values: tuple[float, ...] = ()
    note: str = ""

    @classmethod
    def of(cls, *values: float, note: str = "") -> Figure:
        return cls(tuple(float(v) for v in values), note)

    @classmethod
    def missing(cls, note: str) -> Figure:
        return cls((), note)

    @property
    def ok(self) -> bool:
        return bool(self.values)

    @property
    def value(self) -> float | None:
        return median(self.values) if self.values else None

    @property
    def spread(self) -> float | None:
        return spread(self.values) if len(self.values) > 1 else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"values": list(self.values)}
        if self.values:
            data["median"] = self.value
            data["spread"] = self.spread
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figure:
        return cls(tuple(float(v) for v in data.get("values", ())), str(data.get("note", "")))


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """Max minus min: with 3-5 repeats, the honest width (no distribution assumed)."""
    if not values:
        raise ValueError("spread of no values")
    return float(max(values) - min(values))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator ÷ denominator, or None when either is unknown or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Goal:
    """A target held against one column of a row: `ours` (the value) or `ratio`."""

    op: Op
    target: float
    on: Literal["ours", "ratio"] = "ours"

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return {
            "<=": value <= self.target,
            "<": value < self.target,
            ">=": value >= self.target,
            ">": value > self.target,
        }[self.op]

    def describe(self, unit: str) -> str:
        subject = "ratio " if self.on == "ratio" else ""
        suffix = f" {unit}" if self.on == "ours" and unit not in ("", "x") else ""
        return f"{subject}{OPS[self.op]} {format_number(self.target)}{suffix}"


@dataclass(frozen=True)
class Metric:
    """A table row: our figure against a reference (upstream's image, a native build, ...)."""

    key: str
    label: str
    unit: str
    ours: Figure
    other: Figure = field(default_factory=Figure)
    other_label: str = "upstream"
    goal: Goal | None = None

    @property
    def ratio(self) -> float | None:
        return ratio(self.ours.value, self.other.value)

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        value = self.ratio if self.goal.on == "ratio" else self.ours.value
        return self.goal.met(value)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "unit": self.unit,
            "ours": self.ours.to_json(),
            "other": self.other.to_json(),
            "other_label": self.other_label,
            "ratio": self.ratio,
            "goal": None
            if self.goal is None
            else {"op": self.goal.op, "target": self.goal.target, "on": self.goal.on},
            "met": self.met,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Metric:
        goal_data = data.get("goal")
        goal = (
            None
            if goal_data is None
            else Goal(goal_data["op"], float(goal_data["target"]), goal_data.get("on", "ours"))
        )
        return cls(
            key=str(data["key"]),
            label=str(data["label"]),
            unit=str(data["unit"]),
            ours=Figure.from_json(data["ours"]),
            other=Figure.from_json(data.get("other", {})),
            other_label=str(data.get("other_label", "upstream")),
            goal=goal,
        )


@dataclass(frozen=True)
class PartResult:
    """What one part (sync, build, ...) measured, when, and what it substituted or assumed."""

    name: str
    commit: str
    started: str  # ISO 8601, UTC
    seconds: float
    metrics: tuple[Metric, ...]
    notes: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "commit": self.commit,
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "metrics": [m.to_json() for m in self.metrics],
            "notes": list(self.notes),
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartResult:
        return cls(
            name=str(data["name"]),
            commit=str(data["commit"]),
            started=str(data["started"]),
            seconds=float(data["seconds"]),
            metrics=tuple(Metric.from_json(m) for m in data["metrics"]),
            notes=tuple(str(n) for n in data.get("notes", ())),
            details=dict(data.get("details", {})),
        )


# ---------------------------------------------------------------------- report.json


def report_json(
    parts: Iterable[PartResult], machine: Mapping[str, Any], generated: str
) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "generated": generated,
        "machine": dict(machine),
        "parts": [p.to_json() for p in parts],
    }


def parse_report(data: Any, where: str) -> list[PartResult]:
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
        raise ConfigError(f"{where}: not a bench report of schema {REPORT_SCHEMA}")
    try:
        return [PartResult.from_json(p) for p in data["parts"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: malformed part: {exc}") from None


def merge_parts(
    previous: Iterable[PartResult], new: Iterable[PartResult], commit: str, order: Sequence[str]
) -> list[PartResult]:
    """Earlier results of parts not re-run now are kept (a long benchmark may be run part by
    part), unless they measured another commit; the result follows `order`."""
    by_name = {p.name: p for p in previous if p.commit == commit}
    by_name.update({p.name: p for p in new})
    return [by_name[name] for name in order if name in by_name]


# ------------------------------------------------------------------------ formatting


def _decimals(value: float) -> int:
    """Decimals that give `value` three significant figures (none for 100 and above)."""
    if value == 0 or not math.isfinite(value):
        return 0
    return max(0, 2 - math.floor(math.log10(abs(value))))


def format_number(value: float, decimals: int | None = None) -> str:
    """Three significant figures, thousands separated: 0.0123, 1.23, 12.3, 1,234; or a fixed
    number of decimals (a spread printed to its median's precision)."""
    if not math.isfinite(value):
        return str(value)
    if value == 0 and decimals is None:
        return "0"
    places = _decimals(value) if decimals is None else decimals
    return f"{value:,.{places}f}"


def format_figure(figure: Figure, unit: str) -> str:
    if not figure.ok:
        return figure.note or "—"
    value = figure.value
    assert value is not None
    text = format_number(value)
    if unit == "x":
        text += "x"
    elif unit:
        text += f" {unit}"
    if figure.spread is not None:
        half = format_number(figure.spread / 2, _decimals(value))
        text += f" ±{half} (n={len(figure.values)})"
    if figure.note:
        text += f" ({figure.note})"
    return text


def format_ratio(value: float | None) -> str:
    return "—" if value is None else f"{format_number(value)}x"


def format_met(met: bool | None) -> str:
    return {True: "yes", False: "no", None: "—"}[met]


def table_rows(metrics: Iterable[Metric]) -> list[list[str]]:
    rows = []
    for m in metrics:
        other = format_figure(m.other, m.unit)
        if m.other.ok and m.other_label != "upstream":
            other += f" ({m.other_label})"
        rows.append(
            [
                m.label,
                format_figure(m.ours, m.unit),
                other,
                format_ratio(m.ratio),
                m.goal.describe(m.unit) if m.goal else "",
                format_met(m.met),
            ]
        )
    return rows


TABLE_HEADER = ["metric", "ours", "upstream (or reference)", "ratio", "goal", "met?"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(metrics: Iterable[Metric]) -> str:
    lines = [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join(["---", "---:", "---:", "---:", "---", "---"]) + "|",
    ]
    for row in table_rows(metrics):
        if row[-1] == "no":
            row[-1] = "**no**"  # a missed goal stands out where the table is read
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def machine_line(machine: Mapping[str, Any]) -> str:
    parts = [f"{machine.get('cpus', '?')} cores", str(machine.get("cpu_model", "unknown CPU"))]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']} GiB RAM")
    if machine.get("docker"):
        parts.append(f"Docker {machine['docker']}")
    return ", ".join(parts)


def _iso_after(started: str, seconds: float) -> str:
    """`started` (ISO 8601, UTC) plus `seconds`, in the same form."""
    moment = datetime.fromisoformat(started.replace("Z", "+00:00")) + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def markdown_report(
    parts: Sequence[PartResult], machine: Mapping[str, Any], generated: str, heading: str = "#"
) -> str:
    metrics = [m for p in parts for m in p.metrics]
    commits = sorted({p.commit[:7] for p in parts})
    # From the first part's start to the last part's end (parts may be run on their own).
    starts = sorted(p.started for p in parts)
    ends = sorted(_iso_after(p.started, p.seconds) for p in parts)
    when = starts[0][:16].replace("T", " ") if starts else generated[:16].replace("T", " ")
    if ends and ends[-1][:16] != when.replace(" ", "T"):
        when += f" to {ends[-1][:16].replace('T', ' ')}"
    lines = [
        f"{heading} Benchmark: ours vs upstream's `.devops/cpu.Dockerfile`",
        "",
        f"Measured {when} UTC on {machine_line(machine)}; llama.cpp "
        f"{', '.join(commits) or '?'}; parts: {', '.join(p.name for p in parts) or 'none'}.",
        "Figures are medians; ± is half the range of the n repeats (single runs carry none).",
        "",
        markdown_table(metrics),
    ]
    notes = [f"- **{p.name}**: {note}" for p in parts for note in p.notes]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- README

_README_BLOCK = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)


def replace_readme_section(text: str, body: str) -> str:
    """`text` with everything between the bench markers replaced by `body` (markers kept).

    Exactly one pair must be present, in order: the rest of the README is not ours to touch.
    """
    starts, ends = text.count(README_START), text.count(README_END)
    if starts != 1 or ends != 1 or text.index(README_START) > text.index(README_END):
        raise ConfigError(
            f"README.md must hold exactly one '{README_START}' ... '{README_END}' pair "
            f"(found {starts} start, {ends} end marker(s))",
            "add the two markers where the benchmark table belongs",
        )
    block = f"{README_START}\n{body.strip()}\n{README_END}"
    return _README_BLOCK.sub(lambda _: block, text, count=1)


# ------------------------------------------------------------------------------ chart


def write_chart(metrics: Sequence[Metric], path: Path, title: str) -> Path:
    """Horizontal bars of ours ÷ reference per row (log scale), goal ticks where a row's goal
    is on its ratio. Rows without a ratio are left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or the lab machine
    import matplotlib.pyplot as plt

    rows = [m for m in metrics if m.ratio is not None and m.ratio > 0]
    height = max(2.5, 0.45 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    try:
        if not rows:
            ax.text(0.5, 0.5, "no ratios measured", ha="center", va="center")
            ax.set_axis_off()
        else:
            labels = [f"{m.label} (÷ {m.other_label})" for m in rows]
            values = [float(m.ratio or 0) for m in rows]
            # Colour says whether the row's goal (on its value or its ratio) is met.
            colors = [{True: "#2e7d32", False: "#c62828", None: "#607d8b"}[m.met] for m in rows]
            y = list(range(len(rows)))
            # Bars grow from 1 (parity): left of it ours is smaller/faster, right larger/slower.
            ax.barh(y, [v - 1.0 for v in values], left=1.0, color=colors)
            ax.set_yticks(y, labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.axvline(1.0, color="black", linewidth=0.8)
            goals = [m.goal.target for m in rows if m.goal and m.goal.on == "ratio"]
            low, high = min([*values, *goals, 1.0]), max([*values, *goals, 1.0])
            ax.set_xlim(low / 2, high * 2)
            for i, m in enumerate(rows):
                ax.annotate(
                    f"{format_number(values[i])}x",
                    (values[i], i),
                    xytext=(3 if values[i] >= 1 else -3, 0),
                    textcoords="offset points",
                    ha="left" if values[i] >= 1 else "right",
                    va="center",
                    fontsize=8,
                )
                if m.goal and m.goal.on == "ratio":
                    ax.plot([m.goal.target] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
            ax.set_xlabel("ours ÷ reference (log scale; black tick: goal)")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
