"""cosign: signatures and attestations on what publish pushes, and their verification.

Who signs is resolved from the environment, never from a command line: `COSIGN_KEY` names a
key (a file, `env://VAR`, a KMS URI, or the PEM key itself; its password in `COSIGN_PASSWORD`,
read by cosign itself), else GitHub Actions' OIDC token signs keyless (Sigstore's public
services). cosign's command line names a key only by its file or an `env://` reference, never
its bytes; cosign's environment is an allow-list (its own settings, the signer's, the
network's), so the stage's registry and Hub secrets never reach it (registry credentials go
through a docker config of their own). A key
signs without a transparency log: the key pair is its own root of trust, which is what works
offline (the lab). Verification takes the public key (`COSIGN_PUBLIC_KEY` or --key) or, for
keyless signatures, the certificate identity and issuer.

Attached to every platform image: its smoke record (predicate type SMOKE_PREDICATE) and, when
the image was assembled file by file, its CycloneDX SBOM.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import PublishError, ToolMissingError, UsageError, VerifyError

SMOKE_PREDICATE = "https://llamacpp-images.dev/attestations/smoke/v1"
# The gates a promotion held an image to, with both figures (pipeline/publish/promote.py).
PROMOTION_PREDICATE = "https://llamacpp-images.dev/attestations/promotion/v1"
SBOM_PREDICATE = "https://cyclonedx.org/bom"  # what `cosign attest --type cyclonedx` records
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
INSTALL_HINT = (
    "install cosign (Debian: the `cosign` package, in sid; or a release binary from "
    "github.com/sigstore/cosign), then re-run"
)
# A signing config naming no service: key-based signatures with no transparency log.
_OFFLINE_SIGNING = {
    "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
    "rekorTlogConfig": {},
    "tsaConfig": {},
}


# Of the environment, what cosign is given: these names, and names with these prefixes (its
# own settings, COSIGN_PASSWORD among them, and Sigstore's). A KMS key adds its provider's.
_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "DOCKER_CONFIG",
        "TUF_ROOT",
        "GITHUB_ACTIONS",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    }
)
_ENV_PREFIXES = ("COSIGN_", "SIGSTORE_")
_KMS_PREFIXES = {
    "awskms": ("AWS_",),
    "gcpkms": ("GOOGLE_",),
    "azurekms": ("AZURE_",),
    "hashivault": ("VAULT_",),
}
_ENV_REF_RE = re.compile(r"^env://([A-Za-z_][A-Za-z0-9_]*)$")
_KMS_RE = re.compile(r"^([a-z0-9]+)://")


@dataclass(frozen=True)
class KeyRef:
    """A key as cosign's command line names it (`path` or `env://VAR`), and what of the
    environment it needs: the variable holding it, a KMS provider's settings."""

    argument: str
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    prefixes: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, key: str, variable: str, env: Mapping[str, str], holder: str | None = None
    ) -> KeyRef:
        """`key` as `variable` gave it: a PEM key itself goes to cosign as `env://<holder>`
        (default: `variable`); an `env://VAR` that is unset, a key file that is not one, or a
        PKCS#11 URI holding its PIN is a UsageError naming `variable`."""
        key = key.strip()
        if key.startswith("-----BEGIN"):
            holder = holder or variable
            return cls(f"env://{holder}", {holder: key})
        if match := _ENV_REF_RE.match(key):
            name = match.group(1)
            if not env.get(name):
                raise UsageError(f"{variable} is {key}, but ${name} is not set", f"set {name}")
            return cls(key, {name: env[name]})
        if key.startswith("pkcs11:") and "pin-value" in key:
            raise UsageError(
                f"{variable} holds a PKCS#11 PIN, which would be on cosign's command line",
                "leave pin-value out of the URI and set COSIGN_PKCS11_PIN",
            )
        if match := _KMS_RE.match(key):
            return cls(key, {}, _KMS_PREFIXES.get(match.group(1), ()))
        if key.startswith("pkcs11:") or Path(key).is_file():
            return cls(key)
        raise UsageError(
            f"{variable} names the key file {key!r}, which does not exist",
            "give a key file, env://VAR, a KMS URI, or the PEM key itself",
        )


def cosign_env(env: Mapping[str, str], *refs: KeyRef) -> dict[str, str]:
    """What cosign gets of `env`: the allow-list, and what the keys it is given need."""
    prefixes = (*_ENV_PREFIXES, *(p for ref in refs for p in ref.prefixes))
    allowed = {k: v for k, v in env.items() if k in _ENV_NAMES or k.startswith(prefixes)}
    for ref in refs:
        allowed.update(ref.env)
    return allowed


@dataclass(frozen=True)
class Signer:
    """Who signs: a key (`COSIGN_KEY`), or GitHub's OIDC identity (keyless)."""

    key: KeyRef | None

    @property
    def keyless(self) -> bool:
        return self.key is None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Signer | None:
        if env.get("COSIGN_KEY"):
            return cls(KeyRef.of(env["COSIGN_KEY"], "COSIGN_KEY", env))
        if env.get("ACTIONS_ID_TOKEN_REQUEST_URL") and env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
            return cls(None)
        return None


@dataclass(frozen=True)
class Verifier:
    """What a signature must be checked against: a public key, or a keyless identity."""

    key: KeyRef | None = None
    identity: str | None = None  # a regular expression the certificate's identity must match
    issuer: str = GITHUB_ISSUER

    def arguments(self) -> list[str]:
        if self.key:
            # Key-based signatures carry no transparency-log entry (see the module doc).
            return ["--key", self.key.argument, "--insecure-ignore-tlog=true"]
        if self.identity:
            return [
                "--certificate-identity-regexp",
                self.identity,
                "--certificate-oidc-issuer",
                self.issuer,
            ]
        raise VerifyError(
            "nothing to verify signatures against",
            "set COSIGN_PUBLIC_KEY (or --key PUB) for key signatures, or --identity REGEX "
            "for keyless ones",
        )


class Cosign:
    """The cosign CLI, with the registry credentials of a docker config directory and, of the
    environment, only what cosign needs (`cosign_env`)."""

    def __init__(self, env: Mapping[str, str], docker_config: Path | None = None) -> None:
        binary = shutil.which("cosign", path=env.get("PATH"))
        if binary is None:
            raise ToolMissingError("cosign is not installed", INSTALL_HINT)
        self.binary = binary
        self.env = cosign_env(env)
        if docker_config is not None:
            self.env["DOCKER_CONFIG"] = str(docker_config)

    def _run(
        self, *args: str, error: type[Exception], what: str, keys: tuple[KeyRef | None, ...] = ()
    ) -> str:
        env = {**self.env, **cosign_env({}, *(key for key in keys if key is not None))}
        try:
            done = subprocess.run(
                [self.binary, *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise error(f"{what}: cosign took over 300 s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            detail = lines[-1].strip() if lines else f"exit status {done.returncode}"
            for prefix in ("Error: ", "error during command execution: "):
                detail = detail.removeprefix(prefix)
            raise error(f"{what}: {detail}")
        return done.stdout

    @contextmanager
    def _signing(self, signer: Signer) -> Iterator[list[str]]:
        """The options one sign or attest call takes for `signer`."""
        if signer.keyless:
            yield ["--yes"]
            return
        with tempfile.TemporaryDirectory(prefix="cosign-") as tmp:
            config = Path(tmp) / "signing-config.json"
            config.write_text(json.dumps(_OFFLINE_SIGNING), encoding="utf-8")
            assert signer.key is not None
            yield ["--yes", "--key", signer.key.argument, "--signing-config", str(config)]

    def sign(self, signer: Signer, ref: str) -> None:
        with self._signing(signer) as options:
            self._run(
                "sign", *options, ref, error=PublishError, what=f"signing {ref}", keys=(signer.key,)
            )

    def attest(self, signer: Signer, ref: str, predicate: Path, kind: str) -> None:
        with self._signing(signer) as options:
            self._run(
                "attest",
                *options,
                "--type",
                kind,
                "--predicate",
                str(predicate),
                ref,
                error=PublishError,
                what=f"attesting {kind} on {ref}",
                keys=(signer.key,),
            )

    def verify(self, verifier: Verifier, ref: str) -> None:
        """Raises VerifyError unless `ref` carries a signature `verifier` accepts."""
        self._run(
            "verify",
            *verifier.arguments(),
            ref,
            error=VerifyError,
            what=f"{ref}",
            keys=(verifier.key,),
        )

    def statements(self, verifier: Verifier, ref: str, kind: str) -> list[dict[str, Any]]:
        """The in-toto statements of `kind` on `ref` whose signatures `verifier` accepts."""
        out = self._run(
            "verify-attestation",
            *verifier.arguments(),
            "--type",
            kind,
            ref,
            error=VerifyError,
            what=f"{ref}: no {kind} attestation",
            keys=(verifier.key,),
        )
        statements = []
        for line in out.splitlines():
            if not line.strip():
                continue
            # Signed, but read from the registry: an envelope of another shape is one line.
            try:
                statement = json.loads(base64.b64decode(json.loads(line)["payload"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                statement = None
            if not isinstance(statement, dict) or not isinstance(statement.get("predicate"), dict):
                raise VerifyError(f"{ref}: a {kind} attestation that is not an in-toto statement")
            statements.append(statement)
        return statements

    @contextmanager
    def own_verifier(self, signer: Signer) -> Iterator[Verifier | None]:
        """How publish checks its own signatures before signing again: the public half of
        its key (None for keyless signing, whose identity is only known once signed)."""
        if signer.keyless:
            yield None
            return
        assert signer.key is not None
        public = self._run(
            "public-key",
            "--key",
            signer.key.argument,
            error=PublishError,
            what="reading COSIGN_KEY",
            keys=(signer.key,),
        )
        with tempfile.TemporaryDirectory(prefix="cosign-") as tmp:
            path = Path(tmp) / "cosign.pub"
            path.write_text(public, encoding="utf-8")
            yield Verifier(key=KeyRef(str(path)))

    def has_signature(self, verifier: Verifier, ref: str) -> bool:
        try:
            self.verify(verifier, ref)
        except VerifyError:
            return False
        return True

    def attested(self, verifier: Verifier, ref: str, kind: str) -> list[dict[str, Any]]:
        """`statements`, or none where `ref` has no attestation of `kind` that `verifier`
        accepts (not an error: an image may not have been attested yet)."""
        try:
            return self.statements(verifier, ref, kind)
        except VerifyError:
            return []

    def has_statement(self, verifier: Verifier, ref: str, kind: str) -> bool:
        return bool(self.attested(verifier, ref, kind))


def verifier_from_env(
    key: str | None, identity: str | None, issuer: str | None, env: Mapping[str, str] = os.environ
) -> Verifier:
    """--key, else $COSIGN_PUBLIC_KEY (a file, env://VAR, a KMS URI or the PEM key itself)."""
    given, variable = (key, "--key") if key else (env.get("COSIGN_PUBLIC_KEY"), "COSIGN_PUBLIC_KEY")
    ref = KeyRef.of(given, variable, env, holder="COSIGN_PUBLIC_KEY") if given else None
    return Verifier(ref, identity, issuer or GITHUB_ISSUER)
