"""cosign: signatures and attestations on what publish pushes, and their verification.

Who signs is resolved from the environment, never from a command line: `COSIGN_KEY` names a
key (a file, `env://VAR`, a KMS URI; its password in `COSIGN_PASSWORD`, read by cosign
itself), else GitHub Actions' OIDC token signs keyless (Sigstore's public services). A key
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
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import PublishError, ToolMissingError, VerifyError

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


@dataclass(frozen=True)
class Signer:
    """Who signs: a key (`COSIGN_KEY`), or GitHub's OIDC identity (keyless)."""

    key: str | None

    @property
    def keyless(self) -> bool:
        return self.key is None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Signer | None:
        if env.get("COSIGN_KEY"):
            return cls(env["COSIGN_KEY"])
        if env.get("ACTIONS_ID_TOKEN_REQUEST_URL") and env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
            return cls(None)
        return None


@dataclass(frozen=True)
class Verifier:
    """What a signature must be checked against: a public key, or a keyless identity."""

    key: str | None = None
    identity: str | None = None  # a regular expression the certificate's identity must match
    issuer: str = GITHUB_ISSUER

    def arguments(self) -> list[str]:
        if self.key:
            # Key-based signatures carry no transparency-log entry (see the module doc).
            return ["--key", self.key, "--insecure-ignore-tlog=true"]
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
    """The cosign CLI, with the registry credentials of a docker config directory."""

    def __init__(self, env: Mapping[str, str], docker_config: Path | None = None) -> None:
        binary = shutil.which("cosign", path=env.get("PATH"))
        if binary is None:
            raise ToolMissingError("cosign is not installed", INSTALL_HINT)
        self.binary = binary
        self.env = dict(env)
        if docker_config is not None:
            self.env["DOCKER_CONFIG"] = str(docker_config)

    def _run(self, *args: str, error: type[Exception], what: str) -> str:
        try:
            done = subprocess.run(
                [self.binary, *args],
                env=self.env,
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
            yield ["--yes", "--key", signer.key, "--signing-config", str(config)]

    def sign(self, signer: Signer, ref: str) -> None:
        with self._signing(signer) as options:
            self._run("sign", *options, ref, error=PublishError, what=f"signing {ref}")

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
            )

    def verify(self, verifier: Verifier, ref: str) -> None:
        """Raises VerifyError unless `ref` carries a signature `verifier` accepts."""
        self._run("verify", *verifier.arguments(), ref, error=VerifyError, what=f"{ref}")

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
        )
        statements = []
        for line in out.splitlines():
            if line.strip():
                envelope = json.loads(line)
                statements.append(json.loads(base64.b64decode(envelope["payload"])))
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
            "public-key", "--key", signer.key, error=PublishError, what="reading COSIGN_KEY"
        )
        with tempfile.TemporaryDirectory(prefix="cosign-") as tmp:
            path = Path(tmp) / "cosign.pub"
            path.write_text(public, encoding="utf-8")
            yield Verifier(key=str(path))

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
    return Verifier(key or env.get("COSIGN_PUBLIC_KEY"), identity, issuer or GITHUB_ISSUER)
