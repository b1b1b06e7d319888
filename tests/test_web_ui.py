"""The web UI in the image, in a real browser: Debian's chromium, headless, driven by Playwright
(pointed at the system browser: Playwright's own download is unreachable here). The page loads
without console errors, a message typed into it gets the real model's answer streamed into the
page, and a screenshot lands in the smoke report directory."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from fixtures.images import SmokeImage
from fixtures.lab import require_lab

from pipeline.core.project import Project
from pipeline.oci.engine import ServerContainer, docker_client
from pipeline.records.snapshot import check_snapshot
from pipeline.smoke.settings import load_settings

pytestmark = pytest.mark.docker

QUESTION = "What is the capital of France? Answer in one word."
# The UI asks the server for its built-in agent tools, which llama-server refuses (403) unless
# started with --tools (off by default: "do not enable in untrusted environments"). The browser
# logs each refused request as a console error; these two, and only these, are expected.
EXPECTED_REFUSALS = {("GET", "/tools", 403), ("POST", "/tools", 403)}


def chromium() -> str:
    path = shutil.which("chromium")
    require_lab(path is not None, "Debian's chromium (.ci/provision installs it)")
    assert path is not None
    return path


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    return Project(tmp_path / "project").reports_dir


def test_the_web_ui_answers_in_a_real_browser(
    cpu_amd64: SmokeImage, reports: Path, real_gguf: Path
) -> None:
    from playwright.sync_api import sync_playwright

    real = load_settings().real
    model = f"/models/{real_gguf.name}"
    # The page sends no temperature or seed: the server's defaults decide, so greedy and seeded
    # here, or the 135M model's answer is a draw (it once left Paris out).
    args = f"--jinja --alias {real.alias} --temp 0 --seed {real.seed}"
    env = {"LLAMA_MODEL": model, "LLAMA_SERVER_EXTRA_ARGS": args}
    console: list[tuple[str, str]] = []
    refused: set[tuple[str, str, int]] = set()
    chats: list[Any] = []
    with (
        ServerContainer(
            docker_client(), cpu_amd64.ref, env=env, mounts={real_gguf: model}, container_port=8080
        ) as box,
        sync_playwright() as playwright,
    ):
        box.wait_healthy(box.base_url, 60)
        browser = playwright.chromium.launch(
            executable_path=chromium(), headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: console.append((m.type, m.text)))
        page.on("pageerror", lambda e: console.append(("pageerror", str(e))))

        def seen(response: Any) -> None:
            path = "/" + response.url.split("/", 3)[-1].split("?")[0]
            if response.status >= 400:
                refused.add((response.request.method, path, response.status))
            if path == "/v1/chat/completions":
                chats.append(response)

        page.on("response", seen)
        page.goto(box.base_url + "/", wait_until="networkidle")
        # The app sets the title itself once it has started: wait for it, not for the load.
        page.wait_for_function("document.title.toLowerCase().includes('llama')", timeout=30_000)
        box_input = page.locator("textarea").first
        box_input.fill(QUESTION)
        box_input.press("Enter")
        # The answer is the model's: it streams in after the question, and names Paris.
        page.wait_for_function(
            "q => document.body.innerText.split(q).slice(-1)[0].includes('Paris')",
            arg=QUESTION,
            timeout=90_000,
        )
        reports.mkdir(parents=True, exist_ok=True)
        shot = reports / "web-ui-cpu-amd64.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert chats, "the page sent no chat completion"
    request = chats[-1].request
    assert request.post_data_json["stream"] is True
    assert chats[-1].headers["content-type"].startswith("text/event-stream")
    assert refused <= EXPECTED_REFUSALS, refused
    errors = [
        text
        for kind, text in console
        if kind in ("error", "pageerror")
        and not (refused and re.fullmatch(r"Failed to load resource: .*\(Forbidden\)", text))
    ]
    assert errors == [], errors
    assert shot.stat().st_size > 10_000
    print(f"\nFIGURE web UI screenshot {shot} ({shot.stat().st_size} bytes)")


def test_a_lock_file_out_of_step_fails_the_ui_build_in_one_line(
    lab_project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """package.json asks for a dependency package-lock.json does not have: the build stops in
    the ui stage with one line naming the file."""
    from fixtures.lab import build_lock, copy_project

    from pipeline.build import build
    from pipeline.build.options import BuildOptions
    from pipeline.core.errors import BuildError
    from pipeline.records.snapshot import check_snapshot

    root = copy_project(tmp_path / "project")
    project = Project(root)
    shutil.copytree(lab_project.third_party, project.third_party, symlinks=True)
    snapshot = check_snapshot(project)
    package = project.third_party / "vendor" / "tools" / "ui" / "package.json"
    package.write_text(
        package.read_text().replace(
            '"devDependencies": {', '"devDependencies": {\n\t\t"is-number": "7.0.0",', 1
        )
    )
    options = BuildOptions.named(project, platforms=("linux/amd64",), backends=("cpu",), quiet=True)
    with build_lock(), pytest.raises(BuildError) as raised:
        build(options, snapshot)
    assert "tools/ui/package-lock.json does not match tools/ui/package.json" in str(raised.value)
    capsys.readouterr()


def test_the_ui_stage_is_reused_across_a_pin_bump(lab_project: Project) -> None:
    """A pin bump changes the commit, its build number and SOURCE_DATE_EPOCH (the commit's
    date); with tools/ui unchanged, the ui stage must come from the cache (it is two minutes of
    the build). Built as `nox -s build` builds it: its build args and the CA secret."""
    import subprocess

    from fixtures.lab import build_lock

    from pipeline.build.command import HOST_CA_BUNDLE

    snapshot = check_snapshot(lab_project)
    pins = [
        (snapshot.commit, str(snapshot.build_number or 0), str(snapshot.source_date_epoch)),
        ("f" * 40, "9999", str(snapshot.source_date_epoch + 86_400 * 7)),
    ]
    logs = []
    for commit, number, epoch in pins:
        command = ["docker", "buildx", "build", "--progress=plain", "--target", "ui"]
        command += ["--file", str(lab_project.rendered_dockerfile("cpu"))]
        command += ["--platform", "linux/amd64"]
        for key, value in (
            ("LLAMA_CPP_COMMIT", commit),
            ("LLAMA_CPP_BUILD_NUMBER", number),
            ("SOURCE_DATE_EPOCH", epoch),
        ):
            command += ["--build-arg", f"{key}={value}"]
        if HOST_CA_BUNDLE.is_file():
            command += ["--secret", f"id=host-ca,src={HOST_CA_BUNDLE}"]
        with build_lock():
            done = subprocess.run(
                [*command, str(lab_project.third_party)],
                capture_output=True,
                text=True,
                check=False,
            )
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append(done.stderr)
    step = re.search(r"^#(\d+) \[ui \d+/\d+\] RUN --mount=type=cache,id=npm-", logs[1], re.M)
    assert step, logs[1][-3000:]
    assert re.search(rf"^#{step[1]} CACHED$", logs[1], re.M), "the UI was rebuilt after a bump"
