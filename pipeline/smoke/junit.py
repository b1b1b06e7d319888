"""How a smoke record is shown: a table on the terminal, JUnit XML for CI report viewers."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

from rich.table import Table

from pipeline.core.console import out
from pipeline.records import SmokeRecord


def junit_xml(reports: Sequence[SmokeRecord]) -> str:
    """JUnit XML (one testsuite per image and platform) for CI test-report viewers."""
    root = ET.Element("testsuites", name="smoke")
    totals = {"tests": 0, "failures": 0, "skipped": 0, "time": 0.0}
    for report in reports:
        failures = len(report.failed)
        skipped = sum(c.skipped for c in report.checks)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"smoke {report.backend} {report.platform}",
            tests=str(len(report.checks)),
            failures=str(failures),
            errors="0",
            skipped=str(skipped),
            time=f"{report.seconds:.3f}",
        )
        props = ET.SubElement(suite, "properties")
        for key in ("image", "digest", "backend", "platform", "model"):
            ET.SubElement(props, "property", name=key, value=str(getattr(report, key) or ""))
        for check in report.checks:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"smoke.{report.backend}.{report.arch}",
                name=check.name,
                time=f"{check.seconds:.3f}",
            )
            if check.skipped:
                ET.SubElement(case, "skipped", message=check.detail)
            elif not check.passed:
                failure = ET.SubElement(case, "failure", message=check.detail[:200])
                failure.text = check.detail
            elif check.detail:
                ET.SubElement(case, "system-out").text = check.detail
        totals["tests"] += len(report.checks)
        totals["failures"] += failures
        totals["skipped"] += skipped
        totals["time"] += report.seconds
    for key, value in totals.items():
        root.set(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def print_record(report: SmokeRecord) -> None:
    table = Table(title=f"smoke {report.backend} {report.platform}: {report.image}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        result = (
            "[yellow]SKIP[/yellow]"
            if c.skipped
            else "[green]PASS[/green]"
            if c.passed
            else "[red]FAIL[/red]"
        )
        table.add_row(c.name, result, f"{c.seconds:.2f}", c.detail)
    out.print(table)
    verdict = "[green]passed[/green]" if report.passed else "[red]FAILED[/red]"
    line = f"{verdict}: {report.seconds:.1f} s from docker run to the last check"
    if report.time_to_healthy is not None:
        line += f"; healthy after {report.time_to_healthy:.2f} s"
    elif not report.passed:
        line += "; never healthy"
    # A passed tier without one server's start (cpus: a server per CPU model) says no more.
    out.print(line)
