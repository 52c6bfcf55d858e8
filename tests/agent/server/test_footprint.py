"""What a serving agent loads: only what serving needs (its memory is a device budget).

``cryptography`` (~9 MB resident) is for installing and verifying bundles; an agent that serves
what its store holds never imports it, though it holds a trust store.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from edge.protocol.signing import SigningKey, TrustStore, key_id, load_public_key, read_public_key
from tests.agent.server.conftest import AgentProcess, install
from tests.agent.server.tiny import make_encoder_bundle
from tests.fixtures.bundles import make_generic_bundle

# A line of `python -X importtime` output: "import time: self | cumulative | [indent]module".
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def test_a_serving_agent_never_imports_cryptography(tmp_path: Path, signing_key: SigningKey, trust: TrustStore,
                                                    key_pair: tuple[Path, Path], profile,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path / "data", profile, trust, [(make_generic_bundle(tmp_path, signing_key), True),
                                                (make_encoder_bundle(tmp_path, signing_key), True)])
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the child lists every module it imports
    agent = AgentProcess(tmp_path / "data", tmp_path / "home", "--trusted-key", str(key_pair[1]))
    try:
        agent.wait_ready()
        infer = httpx.post(agent.url + "/v2/models/tiny/infer", json={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
        assert infer.status_code == 200, infer.text
        embed = httpx.post(agent.url + "/v1/embeddings", json={"model": "embedder", "input": ["hello world"]})
        assert embed.status_code == 200, embed.text
        assert httpx.get(agent.url + "/metrics").status_code == 200
    finally:
        assert agent.stop() == 0, agent.stderr
    imported = {m.group(1) for line in agent.lines if (m := IMPORT_LINE.match(line))}
    assert {"edge.runtime.encoder", "edge.protocol.signing", "uvicorn"} <= imported  # the list is real
    assert not sorted(m for m in imported if m.split(".")[0] == "cryptography")


def test_public_keys_load_without_cryptography_and_match_its_reading(tmp_path: Path, key_pair: tuple[Path, Path],
                                                                     signing_key: SigningKey) -> None:
    private, public = key_pair
    fast = read_public_key(public)
    assert fast.id == key_id(load_public_key(public)) == signing_key.id
    # A private key file given as a trusted key is read through cryptography, to the same key.
    assert read_public_key(private) == fast
    message = b"payload"
    fast.verify(signing_key.private.sign(message), message)
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        fast.verify(signing_key.private.sign(message), b"other payload")


def test_other_key_files_get_cryptography_s_errors(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey

    from edge.errors import ConfigError

    ed448 = tmp_path / "ed448.pub"
    ed448.write_bytes(Ed448PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        read_public_key(ed448)
    garbage = tmp_path / "garbage.pub"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM Ed25519 public key"):
        read_public_key(garbage)
