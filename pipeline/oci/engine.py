"""The Docker engine through docker-py: the client, containers, local images.

`ServerContainer` owns one container's whole life (created and started on enter, force-removed
on exit whatever happens: success, failure, timeout, Ctrl-C, SIGTERM); smoke runs every check
in one, bench runs the servers it measures in one. Every container carries labels naming the
run and the process that started it, so leftovers can be found and removed.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pipeline.core.errors import DockerUnavailableError, SmokeError
from pipeline.oci.elf import ImageTree
from pipeline.oci.image import split_reference
from pipeline.oci.registry import Credentials

# Labels on every container the pipeline starts: the run finds its own, the pid tells which
# process (a test, a person's shell) left one behind.
RUN_LABEL = "io.llama-server-images.run"
RUN_PID_LABEL = "io.llama-server-images.run.pid"
BUILD_HINT = "build it with `nox -s build -- --load`, or pass an image present locally"


def docker_client() -> Any:
    """A docker-py client that answered a ping, or DockerUnavailableError."""
    import docker
    from docker.errors import DockerException

    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as exc:
        raise DockerUnavailableError(
            f"no Docker engine answers at {where} ({type(exc).__name__})",
            "start dockerd (on a lab machine: .ci/provision), or set DOCKER_HOST",
        ) from None
    return client


def free_port() -> int:
    """A port free on loopback now (the kernel picks; another process could take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------ images


def local_image(client: Any, ref: str) -> Any | None:
    """The engine's image `ref`, or None when the engine does not have it."""
    from docker.errors import ImageNotFound

    try:
        return client.images.get(ref)
    except ImageNotFound:
        return None


def image_digest(image: Any) -> str | None:
    """The manifest digest a local image was pulled or pushed as, else its own id (with the
    containerd store, the digest of its manifest or index)."""
    for ref in image.attrs.get("RepoDigests") or []:
        return str(ref).rsplit("@", 1)[-1]
    return str(image.id) if image.id else None


def has_digest(image: Any, digest: str) -> bool:
    """Whether the local `image` is the manifest (or index) `digest`."""
    digests = {str(ref).rsplit("@", 1)[-1] for ref in image.attrs.get("RepoDigests") or []}
    return digest in digests or image.id == digest


def pull(client: Any, ref: str, platform: str, credentials: Credentials | None) -> Any:
    """Pull `name@sha256:…` (or `name:tag`) for `platform` into the engine; the image. The
    credentials go to the engine in the API call, never on a command line."""
    from docker.errors import APIError, ImageNotFound

    name, reference = split_reference(ref)
    repository = ref.rsplit("@", 1)[0] if "@" in ref else ref.rsplit(":", 1)[0]
    auth = (
        {"username": credentials.username, "password": credentials.secret} if credentials else None
    )
    try:
        return client.images.pull(repository, tag=reference, platform=platform, auth_config=auth)
    except (APIError, ImageNotFound) as exc:
        detail = " ".join(str(getattr(exc, "explanation", None) or exc).split())[:300]
        raise SmokeError(
            f"cannot pull {ref} for {platform} from {name.registry}: {detail}",
            "was it pushed (nox -s build -- … --push-by-digest)? are the credentials set?",
        ) from None


@dataclass(frozen=True)
class ImageSizes:
    uncompressed: int  # the layers' sizes added up (`docker history`)
    compressed: int | None  # what the containerd store holds: the pushed content


def image_sizes(client: Any, ref: str, platform: str) -> ImageSizes | None:
    """Sizes of a local image; None when the engine cannot say.

    The layers' own sizes add up to the uncompressed size only once they are unpacked, which
    the engine does for a foreign platform when a container is created: so one is created
    (never started) and removed first.
    """
    from docker.errors import DockerException

    try:
        image = client.images.get(ref)
        container = client.containers.create(ref, platform=platform)
        container.remove(force=True)
        history = client.api.history(ref)
    except DockerException:
        return None
    compressed = image.attrs.get("Size")
    return ImageSizes(
        sum(int(layer.get("Size") or 0) for layer in history),
        int(compressed) if isinstance(compressed, int) else None,
    )


def image_tree(client: Any, ref: str, platform: str) -> ImageTree:
    """The image's filesystem (paths, symlinks, ELF dynamic sections), read from `docker
    export` of a container created from it and never started: no code of the image runs."""
    container = client.containers.create(
        ref, platform=platform, labels={RUN_LABEL: "export", RUN_PID_LABEL: str(os.getpid())}
    )
    try:
        return ImageTree.from_chunks(container.export())
    finally:
        container.remove(force=True)


# -------------------------------------------------------------------------- containers


def remove_containers(client: Any, **labels: str) -> int:
    """Force-remove every container (running or not) carrying all of `labels`."""
    from docker.errors import APIError, NotFound

    filters = [f"{key}={value}" for key, value in labels.items()]
    removed = 0
    for container in client.containers.list(all=True, filters={"label": filters}):
        try:
            container.remove(force=True)
            removed += 1
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise
    return removed


@contextmanager
def private_network(client: Any, prefix: str) -> Iterator[str]:
    """A user-defined bridge network of its own (its containers reach each other by name); its
    name. Removed on exit: the containers on it must be gone by then (theirs exit first)."""
    from docker.errors import NotFound

    name = f"{prefix}-{secrets.token_hex(4)}"
    labels = {RUN_LABEL: name, RUN_PID_LABEL: str(os.getpid())}
    network = client.networks.create(name, driver="bridge", labels=labels)
    try:
        yield name
    finally:
        with suppress(NotFound):
            network.remove()


class ServerExited(Exception):
    """The container stopped before the condition we were waiting for."""


def device_groups(devices: tuple[str, ...]) -> list[str]:
    """The host's group ids owning `devices` and, for a directory such as /dev/dri, its
    entries: `docker run --group-add` for each, as a non-root process needs to open them."""
    gids: set[int] = set()
    for device in map(Path, devices):
        for path in [device, *(device.iterdir() if device.is_dir() else ())]:
            with suppress(OSError):
                gids.add(path.stat().st_gid)
    return [str(gid) for gid in sorted(gids - {0})]


class ServerContainer:
    """A container from `image`, started on enter and force-removed on exit, whatever happens.

    The port is published on 127.0.0.1 only (a free one unless `host_port` is given); with
    `network_host` the container shares the host's network (for reaching a loopback server)
    and must itself listen on loopback. `mounts` are bind mounts, read-only; `gpus` asks for
    every GPU (`--gpus all`); `user`, `read_only` and `memory` are `docker run`'s --user,
    --read-only and --memory (bytes); `network` a user-defined network to join (its other
    containers reach this one by `name`), `restart` a restart policy (`on-failure`),
    `entrypoint` another program than the image's (QEMU, for the cpus tier).
    """

    def __init__(
        self,
        client: Any,
        image: str,
        *,
        platform: str | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        mounts: dict[Path, str] | None = None,
        container_port: int | None = None,
        host_port: int | None = None,
        network_host: bool = False,
        health_interval: float | None = None,
        gpus: bool = False,
        user: str | None = None,
        read_only: bool = False,
        memory: int | None = None,
        network: str | None = None,
        name: str | None = None,
        restart: str | None = None,
        entrypoint: list[str] | None = None,
        devices: tuple[str, ...] = (),
    ) -> None:
        self.client = client
        self.image = image
        self.platform = platform
        self.env = env or {}
        self.command = command or []
        self.mounts = mounts or {}
        self.container_port = container_port
        self.host_port = host_port
        self.network_host = network_host
        self.health_interval = health_interval
        self.gpus = gpus
        self.devices = devices
        self.user = user
        self.read_only = read_only
        self.memory = memory
        self.network = network
        self.name = name
        self.restart = restart
        self.entrypoint = entrypoint
        self.run_id = secrets.token_hex(8)
        self.container: Any = None
        self.started_at = 0.0

    def __enter__(self) -> ServerContainer:
        from docker.errors import APIError, ImageNotFound

        options: dict[str, Any] = {
            "environment": self.env,
            "labels": {RUN_LABEL: self.run_id, RUN_PID_LABEL: str(os.getpid())},
            "volumes": {str(src): {"bind": dst, "mode": "ro"} for src, dst in self.mounts.items()},
            "detach": True,
        }
        if self.platform:
            options["platform"] = self.platform
        if self.user:
            options["user"] = self.user
        if self.read_only:
            options["read_only"] = True
        if self.memory:
            options["mem_limit"] = self.memory
        if self.network:
            options["network"] = self.network
        if self.name:
            options["name"] = self.name
        if self.restart:
            options["restart_policy"] = {"Name": self.restart}
        if self.entrypoint:
            options["entrypoint"] = self.entrypoint
        if self.devices:  # `docker run --device`: AMD's /dev/kfd and /dev/dri, as AMD documents
            options["devices"] = [f"{d}:{d}:rwm" for d in self.devices]
            # The non-root server may open them as the host's groups owning them allow.
            options["group_add"] = device_groups(self.devices)
        elif self.gpus:  # `docker run --gpus all`: the NVIDIA Container Toolkit's device request
            from docker.types import DeviceRequest

            options["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if self.network_host:
            options["network_mode"] = "host"
        elif self.container_port:
            options["ports"] = {f"{self.container_port}/tcp": ("127.0.0.1", self.host_port)}
        if self.health_interval:
            # Only the timing: the test itself stays the image's HEALTHCHECK (empty test = inherit).
            ns = int(self.health_interval * 1e9)
            options["healthcheck"] = {"test": [], "interval": ns, "start_period": 0}
        try:
            self.started_at = time.perf_counter()
            command = self.command or None  # None: the image's own CMD
            self.container = self.client.containers.create(self.image, command, **options)
            self.container.start()
        except BaseException as exc:
            # Created but not started (or interrupted mid-call): nothing of ours may remain.
            remove_containers(self.client, **{RUN_LABEL: self.run_id})
            if isinstance(exc, ImageNotFound):
                raise SmokeError(f"image {self.image} not found locally", BUILD_HINT) from None
            if isinstance(exc, APIError):
                text = " ".join(str(exc.explanation or exc).split())
                if "already allocated" in text or "address already in use" in text:
                    raise SmokeError(
                        f"cannot publish port {self.host_port}: {text}",
                        "choose another --port, or omit --port to use a free one",
                    ) from None
                raise SmokeError(f"cannot start a container from {self.image}: {text}") from None
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        remove_containers(self.client, **{RUN_LABEL: self.run_id})

    @property
    def base_url(self) -> str:
        """Where the server answers; ServerExited if it stopped before Docker mapped a port."""
        if self.network_host:
            return f"http://127.0.0.1:{self.container_port}"
        for _ in range(100):
            self.container.reload()
            ports = self.container.attrs["NetworkSettings"].get("Ports") or {}
            binding = ports.get(f"{self.container_port}/tcp")
            if binding:
                return f"http://127.0.0.1:{binding[0]['HostPort']}"
            # A container that exits at once loses its port mapping before we can read it.
            state, code = self.status()
            if state in ("exited", "dead"):
                raise ServerExited(f"server exited with code {code} before /health answered")
            time.sleep(0.05)
        raise SmokeError(f"Docker published no port for {self.container_port}/tcp of {self.image}")

    @property
    def pid(self) -> int:
        """The host pid of the container's main process (its /proc is readable from here)."""
        self.container.reload()
        return int(self.container.attrs["State"]["Pid"])

    def status(self) -> tuple[str, int | None]:
        self.container.reload()
        state = self.container.attrs["State"]
        return state["Status"], state.get("ExitCode")

    def logs(self, tail: int | str = "all") -> str:
        raw: bytes = self.container.logs(stdout=True, stderr=True, tail=tail)
        return raw.decode("utf-8", "replace")

    def log_tail(self, lines: int = 15) -> list[str]:
        return [line for line in self.logs(tail=lines).splitlines() if line.strip()]

    def wait_healthy(self, url: str, timeout: float) -> float:
        """Poll `url`/health until 200; seconds since start. ServerExited / TimeoutError."""
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=2.0) as http:
            while True:
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        return time.perf_counter() - self.started_at
                except httpx.HTTPError:
                    pass  # not listening yet, or reset while loading
                state, code = self.status()
                if state in ("exited", "dead"):
                    raise ServerExited(f"server exited with code {code} before /health answered")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"/health did not answer 200 within {timeout:.0f} s")
                time.sleep(0.1)

    def wait_exit(self, timeout: float) -> int:
        try:
            result = self.container.wait(timeout=timeout)
        except Exception as exc:  # requests' ReadTimeout/ConnectionError, by docker-py version
            raise TimeoutError(f"container still running after {timeout:.0f} s") from exc
        return int(result.get("StatusCode", -1))
