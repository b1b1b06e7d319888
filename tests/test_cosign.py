"""cosign as the pipeline runs it: the real cosign, behind a recording shim that writes down each
command line and environment it is started with before it hands over to cosign. Keys reach
cosign by file or `env://` reference, never by their bytes on a command line; of the stage's
environment cosign gets an allow-list, never the registry's or the Hub's secrets."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
from fixtures.lab import require_lab
from fixtures.registry import LocalRegistry
from fixtures.signing import KeyPair

from pipeline.core.errors import UsageError
from pipeline.oci.cosign import Cosign, KeyRef, Signer, verifier_from_env
from pipeline.oci.image import MEDIA_OCI_MANIFEST, Manifest, sha256_digest
from pipeline.oci.registry import RegistryClient

SECRETS = {
    "REGISTRY_PASSWORD": "registry-secret-1",
    "DOCKERHUB_TOKEN": "hub-secret-2",
    "HF_TOKEN": "hf-secret-3",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-4",
}
SHIM = """#!/bin/sh
# Writes down how cosign is started, then is cosign.
log="{log}/$$"
printf '%s\\n' "$@" > "$log.argv"
env > "$log.env"
exec {cosign} "$@"
"""


def push_tiny_image(registry: LocalRegistry, repository: str) -> str:
    """A one-layer image pushed through the registry client: its reference by digest."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        data = b"hello\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(layer.getvalue(), mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer.getvalue())]},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256_digest(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256_digest(blob),
                "size": len(blob),
            }
        ],
    }
    with RegistryClient(registry.host) as client:
        client.push_blob(repository, sha256_digest(config), config)
        client.push_blob(repository, sha256_digest(blob), blob)
        pushed = Manifest.from_bytes(json.dumps(manifest).encode())
        digest = client.put_manifest(repository, pushed.digest, pushed)
    return f"{registry.host}/{repository}@{digest}"


def recorded(log: Path) -> list[tuple[list[str], dict[str, str]]]:
    runs = []
    for argv in sorted(log.glob("*.argv")):
        env_lines = argv.with_suffix(".env").read_text().splitlines()
        env = dict(line.split("=", 1) for line in env_lines if "=" in line)
        runs.append((argv.read_text().splitlines(), env))
    return runs


@pytest.fixture
def shimmed(tmp_path: Path) -> tuple[Path, Path]:
    """(a directory holding the recording `cosign`, where it writes)."""
    real = shutil.which("cosign")
    require_lab(real is not None, "cosign (.ci/provision installs it)")
    bin_dir, log = tmp_path / "shim", tmp_path / "cosign-runs"
    bin_dir.mkdir()
    log.mkdir()
    shim = bin_dir / "cosign"
    shim.write_text(SHIM.format(log=log, cosign=real))
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


@pytest.mark.docker
@pytest.mark.parametrize("form", ["file", "pem-in-the-variable", "env-reference"])
def test_cosign_gets_the_key_by_reference_and_no_other_secret(
    form: str,
    shimmed: tuple[Path, Path],
    make_registry: Any,
    cosign_keys: KeyPair,
    tmp_path: Path,
) -> None:
    bin_dir, log = shimmed
    registry: LocalRegistry = make_registry()
    ref = push_tiny_image(registry, "team/app")
    pem = cosign_keys.key.read_text()
    key = {"file": str(cosign_keys.key), "pem-in-the-variable": pem, "env-reference": "env://K"}
    env = {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "COSIGN_KEY": key[form],
        "COSIGN_PASSWORD": cosign_keys.password,
        **SECRETS,
        **({"K": pem} if form == "env-reference" else {}),
    }
    signer = Signer.from_env(env)
    assert signer is not None
    cosign = Cosign(env)
    with cosign.own_verifier(signer) as own:
        assert own is not None
        cosign.sign(signer, ref)
        assert cosign.has_signature(own, ref)  # the real signature, checked by cosign
    runs = recorded(log)
    assert [argv[0] for argv, _ in runs] == ["public-key", "sign", "verify"]
    key_line = pem.splitlines()[1]
    for argv, child_env in runs:
        line = " ".join(argv)
        assert key_line not in line and cosign_keys.password not in line, argv
        assert not any(value in line for value in SECRETS.values()), argv
        assert not set(SECRETS) & set(child_env), sorted(child_env)
        assert child_env["COSIGN_PASSWORD"] == cosign_keys.password
    sign_argv = runs[1][0]
    given = sign_argv[sign_argv.index("--key") + 1]
    assert given == {"file": str(cosign_keys.key), "pem-in-the-variable": "env://COSIGN_KEY"}.get(
        form, "env://K"
    )


def test_a_key_that_is_not_there_is_refused_before_cosign_runs(tmp_path: Path) -> None:
    cases = {
        str(tmp_path / "missing.key"): "names the key file",
        "env://NOT_SET": "$NOT_SET is not set",
        "pkcs11:token=t;object=k;pin-value=1234": "PKCS#11 PIN",
    }
    for key, words in cases.items():
        with pytest.raises(UsageError) as caught:
            Signer.from_env({"COSIGN_KEY": key})
        line = caught.value.line()
        assert words in line and "COSIGN_KEY" in line and "1234" not in line, line
    with pytest.raises(UsageError, match="--key names the key file"):
        verifier_from_env(str(tmp_path / "nope.pub"), None, None, {})
    assert KeyRef.of("awskms:///alias/x", "COSIGN_KEY", {}).prefixes == ("AWS_",)


@pytest.mark.docker
@pytest.mark.parametrize("checks", [7, [], "all of them"])
def test_a_signed_attestation_of_another_shape_is_one_line(
    checks: Any,
    make_registry: Any,
    cosign_keys: KeyPair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Signed by our key, so cosign accepts it, but not what publish attests: verify ends
    with one line (exit 16), never a traceback."""
    from pipeline import cli
    from pipeline.oci.cosign import SMOKE_PREDICATE

    registry: LocalRegistry = make_registry()
    ref = push_tiny_image(registry, "team/app")
    env = {**cosign_keys.signing_env(), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    signer = Signer.from_env(env)
    assert signer is not None
    cosign = Cosign(env)
    cosign.sign(signer, ref)
    body = tmp_path / "predicate.json"
    digest = ref.rsplit("@", 1)[1]
    predicate = {"digest": digest, "platform": "linux/amd64", "passed": True, "checks": checks}
    body.write_text(json.dumps(predicate))
    cosign.attest(signer, ref, body, SMOKE_PREDICATE)
    for name, value in cosign_keys.signing_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    (tmp_path / "version.json").write_text(
        (Path(__file__).parent.parent / "version.json").read_text()
    )
    code = cli.main(["verify", ref])
    err = capsys.readouterr().err
    assert code == 16 and err.count("\n") == 1 and "Traceback" not in err, err
