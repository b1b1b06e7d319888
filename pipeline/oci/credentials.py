"""Registry credentials and the one registry each set belongs to.

Credentials come from the environment or from docker's config.json, never from a command line
or a record. Each set belongs to one registry and is handed to no other: DOCKERHUB_USERNAME /
DOCKERHUB_TOKEN to Docker Hub, REGISTRY_USERNAME / REGISTRY_PASSWORD to the registry
REGISTRY_HOST names (default: the registry of version.json's image), a config.json entry to the
registry it is filed under. A build record or an image reference naming another registry gets
no credentials from here. Registries whose token server lives on another host (Docker Hub's
auth.docker.io is known) need that host in REGISTRY_TOKEN_HOSTS before credentials go to it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import CredentialsError, UsageError
from pipeline.oci.image import DOCKER_HUB

# The key `docker login` writes for Docker Hub in config.json; tools look it up by this name.
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
REGISTRY_HOST_ENV = "REGISTRY_HOST"
TOKEN_HOSTS_ENV = "REGISTRY_TOKEN_HOSTS"
REGISTRY_PAIR = ("REGISTRY_USERNAME", "REGISTRY_PASSWORD")
HUB_PAIR = ("DOCKERHUB_USERNAME", "DOCKERHUB_TOKEN")
# Hosts that issue tokens for a registry besides the registry's own host, known without
# configuration: Docker Hub's token server.
KNOWN_TOKEN_HOSTS = {DOCKER_HUB: ("auth.docker.io",)}
_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
# host[:port]: a DNS name, an IPv4 address or a bracketed IPv6 one.
_HOST_RE = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?\Z"
)


@dataclass(frozen=True, repr=False)
class Credentials:
    """A username and a secret, and the names of the variables they came from (for messages)."""

    username: str
    secret: str
    variables: tuple[str, str]

    def __repr__(self) -> str:
        # The secret must never reach a log, a traceback or an assertion message.
        return f"Credentials(username={self.username!r}, from={'/'.join(self.variables)})"

    @property
    def token(self) -> str:
        """`user:secret` in base64: HTTP Basic's credentials and a docker config's `auth`."""
        return base64.b64encode(f"{self.username}:{self.secret}".encode()).decode("ascii")

    def basic(self) -> str:
        return f"Basic {self.token}"


def registry_host(text: str, what: str) -> str:
    """A registry's name as given (`ghcr.io`, `127.0.0.1:5000`, `docker.io`), normalised
    (lowercase, Docker Hub's aliases folded into docker.io); UsageError when it is not one."""
    host = text.strip().lower().removeprefix("https://").removeprefix("http://").rstrip("/")
    if not _HOST_RE.match(host):
        raise UsageError(
            f"{what} {text!r} is not a registry host",
            "give host or host:port, such as ghcr.io or 127.0.0.1:5000",
        )
    return DOCKER_HUB if host in _HUB_ALIASES else host


def env_pairs(registry: str, home: str) -> list[tuple[str, str]]:
    """Which environment variables hold credentials for `registry`, in order of preference:
    REGISTRY_USERNAME/PASSWORD only when `registry` is `home`, the registry they belong to."""
    pairs = [HUB_PAIR] if registry == DOCKER_HUB else []
    return [*pairs, REGISTRY_PAIR] if registry == home else pairs


def credentials_from_env(registry: str, env: Mapping[str, str], home: str) -> Credentials | None:
    """The first complete pair of variables for `registry`; None means anonymous access."""
    for user_var, secret_var in env_pairs(registry, home):
        user, secret = env.get(user_var, ""), env.get(secret_var, "")
        if user and secret:
            return Credentials(user, secret, (user_var, secret_var))
        if user or secret:
            have, lack = (user_var, secret_var) if user else (secret_var, user_var)
            raise CredentialsError(
                f"{have} is set but {lack} is not (credentials for {registry})",
                "set both, or neither for anonymous access",
            )
    return None


def credentials_from_docker_config(registry: str, directory: Path) -> Credentials | None:
    """What `docker login` (or docker/login-action) stored in config.json's `auths` for
    `registry`; credential helpers are not asked. None when there is nothing."""
    path = directory / "config.json"
    try:
        auths = json.loads(path.read_text(encoding="utf-8")).get("auths") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    key = DOCKER_HUB_CONFIG_KEY if registry == DOCKER_HUB else registry
    entry = auths.get(key) if isinstance(auths, dict) else None
    token = entry.get("auth") if isinstance(entry, dict) else None
    if not isinstance(token, str) or not token:
        return None
    try:
        user, sep, secret = base64.b64decode(token).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return Credentials(user, secret, (str(path), "auths")) if sep and user and secret else None


@dataclass(frozen=True)
class RegistryAccess:
    """Which credentials go to which registry, resolved once with a stage's options: `home`
    is the registry REGISTRY_USERNAME/PASSWORD belong to; `token_hosts` the hosts besides a
    registry's own that may receive its credentials to issue tokens."""

    home: str
    token_hosts: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, image_registry: str, env: Mapping[str, str] | None = None) -> RegistryAccess:
        """$REGISTRY_HOST (else `image_registry`: version.json's) and $REGISTRY_TOKEN_HOSTS."""
        environ = dict(os.environ if env is None else env)
        named = environ.get(REGISTRY_HOST_ENV, "").strip()
        home = registry_host(named, REGISTRY_HOST_ENV) if named else image_registry
        hosts = [h for h in environ.get(TOKEN_HOSTS_ENV, "").split(",") if h.strip()]
        token_hosts = tuple(registry_host(h, TOKEN_HOSTS_ENV).split(":")[0] for h in hosts)
        return cls(home, token_hosts, environ)

    def credentials(self, registry: str) -> Credentials | None:
        """The credentials that belong to `registry`: the environment's first, else docker's
        config.json; None (anonymous) for a registry none belong to."""
        found = credentials_from_env(registry, self.env, self.home)
        if found is not None:
            return found
        config = self.env.get("DOCKER_CONFIG") or Path.home() / ".docker"
        return credentials_from_docker_config(registry, Path(config))
