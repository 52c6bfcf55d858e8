"""Fuzz every parser that reads untrusted bytes: no crash, no hang, only clear errors.

Targets (each a :class:`Target` in :data:`TARGETS`, shared with ``tools/fuzz_long.py``, which
runs the same checks with many more examples):

* MQTT payloads: :func:`edge.protocol.messages.decode` on random bytes, random JSON, mutated
  valid envelopes and hostile JSON (deep nesting, huge numbers, NaN, lone surrogates);
* manifests: :func:`edge.protocol.manifest.parse_manifest`, the same way;
* signature envelopes: :func:`edge.protocol.signing.verify_manifest`;
* bundles: :class:`edge.protocol.bundle.BundleReader` on random bytes, byte-mutated valid
  bundles and generated tars with hostile member names and types, verified and extracted into a
  temporary target: only EdgeError may escape, and nothing may appear outside the target;
* profiles: :func:`edge.protocol.profile.parse_profile` on mutated real profiles and random
  YAML-like data, and ``load_profile_file`` on random and hostile YAML text;
* topics: :meth:`edge.protocol.topics.Topics.parse` and :func:`check_id`.

HTTP request bodies of the agent's inference server and the controller's REST API are fuzzed at
the end through Starlette's TestClient: any body gets a 4xx, never a 5xx.

Each target also checks a round trip on what it accepts (decode(encode(x)) == x), so "accepted
something it cannot represent" is a finding too, not only a crash.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import BundleError, ConfigError, EdgeError, ProfileError, SignatureError, TransportError
from edge.protocol.bundle import BundleReader, write_bundle
from edge.protocol.manifest import parse_manifest
from edge.protocol.messages import (
    Capabilities,
    CommandMessage,
    Desired,
    DesiredModel,
    Event,
    EventKind,
    ModelReport,
    Reported,
    Response,
    Status,
    Telemetry,
    decode,
    encode,
    wrap,
)
from edge.protocol.profile import load_profile_file, parse_profile
from edge.protocol.signing import SigningKey, TrustStore, generate_keypair, load_signing_key, verify_manifest
from edge.protocol.topics import Channel, Command, Topics, check_id

ROOT = Path(__file__).resolve().parents[2]
# Examples per target in CI: enough to hit every hostile family several times, small enough that
# this file runs in well under a minute on two cores. tools/fuzz_long.py runs thousands.
CI_EXAMPLES = 40
# A parser taking this long on one example of a few KiB is a hang for our purposes.
DEADLINE_MS = 2000


# --- hostile building blocks -------------------------------------------------------------------


def _nest(n: int) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


HOSTILE_JSON: list[Callable[[int], bytes]] = [
    lambda n: b"[" * n,  # unterminated deep nesting
    lambda n: b"[" * n + b"]" * n,  # deep nesting, well-formed
    _nest,
    lambda n: b"1" * n,  # a huge integer (Python refuses > 4300 digits with ValueError)
    lambda n: b'{"v": 1, "id": ' + b"9" * n + b"}",
    lambda n: b"1e" + b"9" * min(n, 50),  # overflows to infinity
    lambda n: b'{"ts": NaN, "x": Infinity, "y": -Infinity}',
    lambda n: b'"\\ud800"',  # a lone surrogate: valid JSON escape, not encodable as UTF-8
    lambda n: b'{"id": "\\udfff\\ud800"}',
    lambda n: b"\xef\xbb\xbf{}",  # a byte-order mark
    lambda n: b"\xff\xfe" + "{}".encode("utf-16-le"),
    lambda n: b'{"a": 1, "a": 2}',  # duplicate keys
    lambda n: b"\x00" * (n % 64),
    lambda n: b'"' + b"\\" * (n % 4096) + b'"',
]

# Sizes around the limits that matter: Python's 4,300-digit int limit, its ~1,000 recursion limit.
hostile_sizes = st.sampled_from([1, 2, 64, 999, 1001, 4301, 5000, 60_000]) | st.integers(1, 60_000)
hostile_json = st.builds(lambda f, n: f(n), st.sampled_from(HOSTILE_JSON), hostile_sizes)

# Text includes lone surrogates: JSON can carry them ("\\ud800"), UTF-8 cannot.
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                | st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e"]))
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=16,
)


def _splice(base: bytes, ops: list[tuple[float, int, bytes]]) -> bytes:
    """Apply byte mutations: at a relative position, delete ``cut`` bytes and insert some."""
    data = bytearray(base)
    for where, cut, insert in ops:
        i = int(where * len(data))
        data[i:i + cut] = insert
    return bytes(data)


byte_ops = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 16), st.binary(max_size=8)), min_size=1, max_size=6)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _mutate_tree(base: Any, ops: list[tuple[float, str, Any]]) -> Any:
    """Apply structural mutations to a JSON/YAML tree: replace, delete or add at a chosen path."""
    tree = json.loads(json.dumps(base, default=str))
    for where, op, value in ops:
        paths = _paths(tree)
        path = paths[int(where * len(paths)) % len(paths)]
        if not path:
            if op == "set":
                tree = value
            continue
        parent = tree
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        if op == "set":
            parent[key] = value
        elif op == "del":
            del parent[key]
        elif isinstance(parent, dict):
            parent[f"unknown_{len(parent)}"] = value
        else:
            parent.append(value)
    return tree


tree_ops = st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["set", "del", "add"]), json_values),
                    min_size=1, max_size=4)


# --- valid seeds -------------------------------------------------------------------------------


@cache
def envelopes() -> list[bytes]:
    """Return one valid encoded message of every type."""
    report = ModelReport(name="tiny", version="1.0.0", state="active")
    caps = Capabilities(architecture="x86_64", providers=("CPUExecutionProvider",), ram_mb=1, disk_mb=1, cpu_count=1)
    bodies = [
        Status(state="online", session=3, agent_version="0.1", profile="generic-cpu", capabilities=caps),
        Telemetry(seq=1, session=1, uptime_s=2.5, agent_version="0.1", models=(report,), per_model={"tiny": {"p50": 1.0}}),
        Event(kind=EventKind.INSTALLED, model="tiny", version="1.0.0", deployment_id="r1"),
        Reported(generation=2, models=(report,)),
        Desired(generation=2, models={"tiny": DesiredModel(version="1.0.0", bundle_url="http://c/b", sha256="0" * 64,
                                                           size=10)}),
        CommandMessage(command="deploy", args={"model": "tiny", "n": [1, 2]}),
        Response(command_id="abc", ok=False, error="nope", error_code="incompatible"),
    ]
    return [encode(wrap("dev-1", b, message_id=f"m{i}", ts=1.5)) for i, b in enumerate(bodies)]


@cache
def _keys(folder: str) -> tuple[SigningKey, TrustStore]:
    priv, pub = generate_keypair(Path(folder), "fuzz")
    return load_signing_key(priv), TrustStore.from_files([pub])


@cache
def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="edge-fuzz-"))


def keys() -> tuple[SigningKey, TrustStore]:
    """Return the fuzz session's signing key and trust store."""
    return _keys(str(_workdir() / "keys"))


@cache
def valid_bundle() -> bytes:
    """Return the bytes of a small signed bundle with two payload files."""
    from tests.fixtures.bundles import make_manifest

    work = _workdir() / "seed"
    payload = work / "payload"
    (payload / "tok").mkdir(parents=True)
    (payload / "model.onnx").write_bytes(b"\x08\x07model-bytes" * 20)
    (payload / "tok" / "vocab.txt").write_bytes(b"hello\nworld\n")
    manifest = make_manifest(payload)
    path = write_bundle(work / "seed.edgebundle", manifest, payload, keys()[0])
    return path.read_bytes()


@cache
def valid_manifest() -> bytes:
    """Return the manifest bytes of :func:`valid_bundle`."""
    with tarfile.open(fileobj=io.BytesIO(valid_bundle())) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        return member.read()


@cache
def profiles() -> list[dict[str, Any]]:
    """Return the built-in profiles as loaded YAML."""
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "device_profiles").glob("*.yaml"))]


# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One parser: a strategy for its untrusted input and a check that raises on a finding."""

    name: str
    strategy: Callable[[], st.SearchStrategy[Any]]  # built lazily: seeds are made on first use
    check: Callable[[Any], None]


def _only(allowed: type[EdgeError], fn: Callable[[], Any]) -> Any:
    """Run ``fn``; return its result, or None when it raised ``allowed``; anything else fails."""
    try:
        return fn()
    except allowed as exc:
        assert str(exc), "an error without a message"
        return None


def check_decode(payload: bytes) -> None:
    env = _only(TransportError, lambda: decode(payload))
    if env is None:
        return
    # Accepted: it must survive our own encoder and decode to the same thing (NaN and Infinity,
    # which the encoder would write as null, are refused: test_decode_refuses_non_finite_numbers).
    assert decode(encode(env)) == env


def messages_strategy() -> st.SearchStrategy[bytes]:
    seeds = envelopes()
    return st.one_of(
        st.binary(max_size=512),
        json_values.map(lambda v: json.dumps(v).encode()),
        hostile_json,
        st.builds(_splice, st.sampled_from(seeds), byte_ops),
        st.builds(lambda s, ops: json.dumps(_mutate_tree(json.loads(s), ops)).encode(), st.sampled_from(seeds), tree_ops),
        # a valid envelope with a hostile value spliced in where a field's value starts
        st.builds(lambda s, h: s.replace(b'"ts":1.5', b'"ts":' + h[:200]), st.sampled_from(seeds), hostile_json),
    )


def check_manifest(raw: bytes) -> None:
    manifest = _only(BundleError, lambda: parse_manifest(raw))
    if manifest is not None:
        assert parse_manifest(manifest.to_bytes()) == manifest


def manifest_strategy() -> st.SearchStrategy[bytes]:
    seed = valid_manifest()
    base = json.loads(seed)
    return st.one_of(
        st.binary(max_size=512),
        hostile_json,
        st.builds(_splice, st.just(seed), byte_ops),
        st.builds(lambda ops: json.dumps(_mutate_tree(base, ops)).encode(), tree_ops),
    )


def check_signature(envelope: bytes) -> None:
    _only(SignatureError, lambda: verify_manifest(valid_manifest(), envelope, keys()[1]))


def signature_strategy() -> st.SearchStrategy[bytes]:
    with tarfile.open(fileobj=io.BytesIO(valid_bundle())) as tar:
        member = tar.extractfile("signature.json")
        assert member is not None
        seed = member.read()
    return st.one_of(
        st.binary(max_size=256),
        hostile_json,
        st.builds(_splice, st.just(seed), byte_ops),
        st.builds(lambda ops: json.dumps(_mutate_tree(json.loads(seed), ops)).encode(), tree_ops),
    )


# Names a hostile archive may use: traversal, absolute, odd separators, case twins, long, deep.
MEMBER_NAMES = [
    "manifest.json", "signature.json", "payload/model.onnx", "payload/tok/vocab.txt", "payload/MODEL.onnx",
    "payload/../escape", "../escape", "/etc/passwd-edge-fuzz", "payload//x", "payload/./x", "payload/x\\..\\y",
    "payload/a/b/c/d/e", "payload/" + "n" * 300, "payload/café", "payload/cafe\u0301", "payload/tok",
    "payload/tok/vocab.txt/inner", "payload/\u202egnp.exe", "payload/sym", "other/file", "",
]  # fmt: skip
MEMBER_TYPES = [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE]


def _build_tar(members: list[tuple[str, bytes, int, str, bool]], list_in_manifest: bool) -> bytes:
    """Write a tar whose manifest (first) lists the regular payload members with true hashes."""
    import hashlib

    out = io.BytesIO()
    regular = [(n[len("payload/"):], d) for n, d, t, _, _ in members if t == tarfile.REGTYPE and n.startswith("payload/")]
    manifest = valid_manifest()
    if list_in_manifest and regular:
        base = json.loads(valid_manifest())
        base["files"] = [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest(), "role": "other"}
                         for p, d in regular if p]
        if base["files"]:
            manifest = json.dumps(base).encode()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for name, data, kind, link, lie_size in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            if kind in (tarfile.REGTYPE, tarfile.CONTTYPE):
                info.size = len(data) + (3 if lie_size else 0)
                try:
                    tar.addfile(info, io.BytesIO(data + b"\0\0\0" if lie_size else data))
                except (ValueError, OSError):
                    continue
            else:
                try:
                    tar.addfile(info)
                except (ValueError, OSError):
                    continue
    return out.getvalue()


def bundle_strategy() -> st.SearchStrategy[bytes]:
    seed = valid_bundle()
    member = st.tuples(st.sampled_from(MEMBER_NAMES) | st.text(min_size=1, max_size=40).map(lambda s: "payload/" + s),
                       st.binary(max_size=64), st.sampled_from(MEMBER_TYPES),
                       st.sampled_from(["", "/etc/passwd", "../x", "payload/model.onnx", "manifest.json"]),
                       st.booleans())
    return st.one_of(
        st.binary(max_size=2048),
        st.builds(_splice, st.just(seed), byte_ops),
        st.builds(lambda n: seed[:int(n * len(seed))], st.floats(0, 1)),  # truncated
        st.builds(_build_tar, st.lists(member, min_size=1, max_size=5), st.booleans()),
    )


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _extract(bundle: Path, target: Path, trust: TrustStore | None) -> bool:
    """Verify and extract; return whether it worked (False: an EdgeError with a message)."""
    try:
        with BundleReader(bundle) as reader:
            reader.verify(trust)
            reader.extract(target, trust)
        return True
    except EdgeError as exc:
        assert str(exc)
        return False


def check_bundle(raw: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=_workdir()) as d:
        root = Path(d)
        (root / "in").mkdir()
        bundle = root / "in" / "x.edgebundle"
        bundle.write_bytes(raw)
        (root / "out").mkdir()
        before = _snapshot(root)
        # unsigned path, then the signed path a device takes
        for target, trust in ((root / "out" / "plain", None), (root / "out" / "signed", keys()[1])):
            ok = _extract(bundle, target, trust)
            if target.exists():
                for p in target.rglob("*"):
                    assert not p.is_symlink() and (p.is_dir() or p.is_file()), p
                    assert p.resolve().is_relative_to(target.resolve()), p
                if not ok:
                    assert not any(target.iterdir()), "a failed extraction left files behind"
        inside = ("out/plain", "out/signed")
        outside = {p for p in _snapshot(root) - before if not any(p == t or p.startswith(t + "/") for t in inside)}
        assert not outside, f"written outside the target: {sorted(outside)}"


def check_profile_data(data: Any) -> None:
    profile = _only(ProfileError, lambda: parse_profile(data, "<fuzz>"))
    if profile is not None:
        assert parse_profile(profile.to_dict()) == profile


yaml_scalars = json_scalars | st.binary(max_size=8) | st.dates() | st.datetimes()
yaml_values = st.recursive(
    yaml_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12) | st.integers(), c, max_size=4),
    max_leaves=16,
)


def profile_strategy() -> st.SearchStrategy[Any]:
    seeds = profiles()
    keys_of = sorted({k for p in seeds for k in p})
    return st.one_of(
        yaml_values,
        st.builds(_mutate_tree, st.sampled_from(seeds), tree_ops),
        st.dictionaries(st.sampled_from(keys_of), yaml_values, max_size=8),
        # the same object referenced many times over (what YAML aliases build): must not blow up
        st.builds(_aliased, st.sampled_from(seeds), st.sampled_from(keys_of), st.integers(2, 8)),
    )


def _aliased(seed: dict[str, Any], key: str, depth: int) -> dict[str, Any]:
    x: Any = "lol"
    for _ in range(depth):
        x = [x] * 9
    return {**seed, key: x}


HOSTILE_YAML = [
    "name: x\narchitecture: 2020-99-99\n",  # a timestamp PyYAML cannot build (ValueError)
    "[" * 5000,
    "a: " + "[" * 3000 + "]" * 3000,
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\narchitecture: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
    "a: !!python/object/apply:os.system ['true']\n",
    "a: !!binary '!!!'\n",
    "a: !!float 'x'\n",
    "a: !!int '0x'\n",
    "? [a, b]\n: c\n",
    "\t- tab\n",
    "a: 1\n---\nb: 2\n",
    "%YAML 9.9\n---\na: 1\n",
    "a: *undefined\n",
    "\ufeffname: x\n",
    "a: 1_000_000e1000\n",
    # billion laughs into a field whose error message quotes the value
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
    "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n"
    "schema_version: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n",
]


def check_profile_text(text: str) -> None:
    with tempfile.TemporaryDirectory(dir=_workdir()) as d:
        path = Path(d) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _only(ProfileError, lambda: load_profile_file(path))


def profile_text_strategy() -> st.SearchStrategy[str]:
    seeds = [(ROOT / "device_profiles" / f"{p['name']}.yaml").read_text() for p in profiles()]
    return st.one_of(
        st.text(max_size=300),
        st.sampled_from(HOSTILE_YAML),
        st.builds(lambda s, ops: _splice(s.encode(), ops).decode("utf-8", "replace"), st.sampled_from(seeds), byte_ops),
        st.builds(lambda s, h: s + "\n" + h, st.sampled_from(seeds), st.sampled_from(HOSTILE_YAML)),
    )


TOPIC_LEVELS = ["edge", "v1", "f1", "dev-a", "dev b", "+", "#", "$SYS", "", "cmd", "deploy", "status", "telemetry",
                "desired", "resp", "x" * 70, "ü", "\x00", "a/b"]
TOPICS = Topics("f1")


def check_topic(topic: str) -> None:
    parsed = _only(ConfigError, lambda: TOPICS.parse(topic))
    if parsed is not None:
        device, channel, command = parsed
        assert TOPICS.device(device, channel, command) == topic
        assert check_id(device) == device


def topic_strategy() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=80),
        st.lists(st.sampled_from(TOPIC_LEVELS), max_size=7).map("/".join),
        st.builds(lambda d, c: f"edge/v1/f1/{d}/{c}", st.text(max_size=12), st.sampled_from(
            [ch.value for ch in Channel] + [f"cmd/{c.value}" for c in Command] + ["cmd", "cmd/x/y"])),
    )


def check_id_property(value: str) -> None:
    ok = _only(ConfigError, lambda: check_id(value)) is not None
    bad_chars = set("+#/$ \x00\t\n") & set(value)
    if ok:  # an accepted id can never widen a topic filter or escape its level
        assert not bad_chars and 1 <= len(value) <= 64
        assert TOPICS.parse(TOPICS.device(value, Channel.STATUS)) == (value, Channel.STATUS, None)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("messages.decode", messages_strategy, check_decode),
        Target("manifest.parse_manifest", manifest_strategy, check_manifest),
        Target("signing.verify_manifest", signature_strategy, check_signature),
        Target("bundle.BundleReader", bundle_strategy, check_bundle),
        Target("profile.parse_profile", profile_strategy, check_profile_data),
        Target("profile.load_profile_file", profile_text_strategy, check_profile_text),
        Target("topics.Topics.parse", topic_strategy, check_topic),
        Target("topics.check_id", lambda: st.text(max_size=70), check_id_property),
    )
}


def run_target(target: Target, max_examples: int, deadline_ms: int | None = DEADLINE_MS) -> None:
    """Run one target under hypothesis (the test below and tools/fuzz_long.py call this)."""

    @settings(max_examples=max_examples, deadline=deadline_ms, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(target.strategy())
    def run(value: Any) -> None:
        target.check(value)

    run()


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_parser(name: str) -> None:
    run_target(TARGETS[name], CI_EXAMPLES)


# --- regressions: the hostile inputs that found bugs, pinned -----------------------------------

REGRESSIONS = [
    ("messages.decode", b'{"v": 1, "id": ' + b"9" * 5000 + b"}"),  # ValueError: int digit limit
    ("messages.decode", b"[" * 100_000),
    ("messages.decode", envelopes()[6].replace(b'"command_id":"abc"', b'"command_id":"\\ud800"')),
    ("manifest.parse_manifest", b"1" * 5000),
    ("manifest.parse_manifest", b"[" * 100_000),
    ("signing.verify_manifest", b"9" * 5000),
    ("signing.verify_manifest", b"[" * 60_000),
    ("profile.load_profile_file", HOSTILE_YAML[0]),
    ("profile.load_profile_file", HOSTILE_YAML[1]),
    ("profile.load_profile_file", HOSTILE_YAML[3]),
    ("profile.load_profile_file", HOSTILE_YAML[-1]),  # took minutes: the error quoted the whole value
    ("profile.parse_profile", {**profiles()[0], "schema_version": _aliased({}, "x", 8)["x"]}),
    ("profile.parse_profile", {**profiles()[0], "models": {"encoder": {"precision": "int8",
                                                                       "fallback": [_aliased({}, "x", 8)["x"]]}}}),
]


@pytest.mark.parametrize(("name", "value"), REGRESSIONS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(REGRESSIONS)])
def test_hostile_inputs_give_clear_errors(name: str, value: Any) -> None:
    TARGETS[name].check(value)


def test_decode_refuses_lone_surrogates_it_could_not_reencode() -> None:
    with pytest.raises(TransportError, match="surrogates"):
        decode(envelopes()[6].replace(b'"command_id":"abc"', b'"command_id":"\\ud800"'))
    # a proper surrogate pair is a real character and stays accepted
    pair = decode(envelopes()[6].replace(b'"command_id":"abc"', b'"command_id":"\\ud83d\\ude00"'))
    assert pair.body.command_id == "\U0001f600"  # type: ignore[union-attr]


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_decode_refuses_non_finite_numbers(number: bytes) -> None:
    # Found by this file: accepted (pydantic's allow_inf_nan default) and re-encoded as null.
    with pytest.raises(TransportError, match="finite"):
        decode(envelopes()[0].replace(b'"ts":1.5', b'"ts":' + number))
    telemetry = envelopes()[1]
    assert b'"p50":1.0' in telemetry
    with pytest.raises(TransportError, match="finite"):
        decode(telemetry.replace(b'"p50":1.0', b'"p50":' + number))
    command = envelopes()[5]
    assert b'"n":[1,2]' in command
    with pytest.raises(TransportError, match="NaN and Infinity"):  # free-form arguments too
        decode(command.replace(b'"n":[1,2]', b'"n":[1,' + number + b"]"))
    assert decode(command.replace(b'"n":[1,2]', b'"n":[1,2.5e300]')).body.args["n"] == [1, 2.5e300]  # type: ignore[union-attr]


# --- HTTP request bodies -----------------------------------------------------------------------
# The agent's inference server and the controller's REST API, in process (Starlette's TestClient,
# no network). Every route that reads a body gets random bytes, random JSON, hostile JSON and
# mutated valid requests: the answer must be a 4xx (or a 2xx), never a 5xx.

# Examples per HTTP route in CI (tools/fuzz_long.py: 1,000).
HTTP_EXAMPLES = 25

AGENT_ROUTES: dict[str, dict[str, Any]] = {
    "/v2/models/tiny/infer": {"id": "r1", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                       "data": [1.0, 2.0, 3.0, 4.0]}],
                              "outputs": [{"name": "y"}]},
    "/v2/models/tiny/versions/1.0.0/infer": {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                                         "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]},
    "/v1/embeddings": {"model": "tiny", "input": ["hello", "world"], "encoding_format": "float"},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "stream": False, "temperature": 0.5},
    "/v2/repository/index": {"ready": True},
    "/v2/repository/models/tiny/load": {},
}
CONTROLLER_ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "/api/v1/devices/d1/commands": ("POST", {"command": "ping", "args": {"a": 1}, "ttl_s": 30}),
    "/api/v1/devices/d1/tags": ("PUT", {"tags": ["a", "b"], "add": ["c"], "remove": ["a"]}),
    "/api/v1/devices/d1/groups": ("POST", {"add": ["g1"]}),
    "/api/v1/rollouts": ("POST", {"model": "tiny", "version": "1.0.0", "target": {"kind": "all"},
                                  "waves": [1, 50, 100], "max_failure_rate": 0.1}),
    "/api/v1/rollouts/r-none/pause": ("POST", {"reason": "why"}),
    "/api/v1/tokens": ("POST", {"name": "t", "role": "read"}),
    "/api/v1/bundles": ("POST", {}),  # the raw body is a bundle
}


def _body_strategy(template: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=256),
        json_values.map(lambda v: json.dumps(v).encode()),
        hostile_json,
        st.builds(lambda ops: json.dumps(_mutate_tree(template, ops)).encode(), tree_ops),
        st.just(json.dumps(template).encode()),
    )


@pytest.fixture(scope="module")
def agent_http(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("onnxruntime")
    from starlette.testclient import TestClient

    from edge.agent.server.app import create_app
    from edge.agent.server.registry import Registry
    from tests.agent.server.tiny import ListSource, make_installed

    registry = Registry(ListSource([make_installed(tmp_path_factory.mktemp("models"))]))
    with TestClient(create_app(registry), raise_server_exceptions=False) as client:
        assert registry.wait_loaded(60)
        yield client


@pytest.fixture(scope="module")
def controller_http(tmp_path_factory: pytest.TempPathFactory, trust: TrustStore, signing_key: SigningKey) -> Any:
    from starlette.testclient import TestClient

    from edge.fleet import auth
    from edge.fleet.api import ApiContext, create_app
    from edge.fleet.artifacts import ArtifactStore
    from edge.fleet.db import open_database
    from edge.fleet.desired import DesiredPublisher
    from edge.fleet.ingest import Ingestor
    from edge.fleet.rollout import RolloutEngine
    from tests.fixtures.bundles import make_generic_bundle
    from tests.fleet.helpers import Devices, ingest

    tmp = tmp_path_factory.mktemp("controller")
    db = open_database(f"sqlite:///{tmp / 'fleet.db'}", tmp)
    store = ArtifactStore(db, tmp / "store", trust)
    secret = auth.download_secret(db)
    topics = Topics("t")
    ctx = ApiContext(db, store, RolloutEngine(db, store), DesiredPublisher(db, topics, "http://ctl", secret), secret)
    admin = auth.create_token(db, "fuzz-admin", auth.Role.ADMIN)["token"]
    # A known device and a stored bundle, so bodies get past "unknown device/model" to the real work.
    ingest(Ingestor(db, topics), Devices(topics, lambda: 1_767_225_600.0).birth("d1", 1))
    store.add_file(make_generic_bundle(tmp / "bundles", signing_key))
    with TestClient(create_app(ctx), raise_server_exceptions=False,
                    headers={"authorization": f"Bearer {admin}"}) as client:
        yield client
    db.dispose()


def _post(client: Any, method: str, path: str, body: bytes) -> Any:
    return client.request(method, path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", list(AGENT_ROUTES))
def test_agent_http_bodies_get_4xx_never_5xx(agent_http: Any, path: str) -> None:
    @settings(max_examples=HTTP_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_body_strategy(AGENT_ROUTES[path]))
    def run(body: bytes) -> None:
        r = _post(agent_http, "POST", path, body)
        assert r.status_code < 500, (r.status_code, r.text[:300])

    run()


@pytest.mark.parametrize("path", list(CONTROLLER_ROUTES))
def test_controller_http_bodies_get_4xx_never_5xx(controller_http: Any, path: str) -> None:
    method, template = CONTROLLER_ROUTES[path]

    @settings(max_examples=HTTP_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_body_strategy(template))
    def run(body: bytes) -> None:
        r = _post(controller_http, method, path, body)
        assert r.status_code < 500, (r.status_code, r.text[:300])

    run()


# Found by this file in the controller's JSON bodies (edge/fleet/bodies.py now refuses them): 500s
# from huge integers and deep nesting (ValueError/RecursionError), lone surrogates that SQLite
# cannot store, and NaN/Infinity that no field means.
CONTROLLER_FOUND = [
    ("POST", "/api/v1/tokens", b'{"name": ' + b"9" * 5000 + b"}", "not usable JSON"),
    ("POST", "/api/v1/rollouts", b"[" * 100_000, "nested too deeply"),
    ("POST", "/api/v1/tokens", b'{"name": "\\ud800"}', "lone surrogate"),
    ("POST", "/api/v1/devices/d1/commands", b'{"command": "ping", "args": {"a": "\\ud800"}}', "lone surrogate"),
    ("POST", "/api/v1/devices/d1/commands", b'{"command": "ping", "ttl_s": NaN}', "NaN"),
    ("POST", "/api/v1/devices/d1/commands", b'{"command": "ping", "args": {"a": [-Infinity]}}', "-Infinity"),
    ("POST", "/api/v1/rollouts/r-none/pause", b'{"reason": 1e999}', "Infinity"),
]


@pytest.mark.parametrize(("method", "path", "body", "says"), CONTROLLER_FOUND,
                         ids=[f"controller-{i}" for i in range(len(CONTROLLER_FOUND))])
def test_controller_hostile_bodies_get_400(controller_http: Any, method: str, path: str, body: bytes,
                                           says: str) -> None:
    r = _post(controller_http, method, path, body)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert says in r.json()["error"]["message"]


# Found by this file in the agent's request parsing and fixed by its owner: pinned.
AGENT_FOUND = [
    ("/v2/models/tiny/infer", b"1" * 5000),  # int over Python's digit limit: ValueError
    ("/v1/chat/completions", b"[" * 100_000),  # RecursionError
    ("/v2/models/tiny/infer", b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": [], "data": [1, 2, 3, 4]}]}'),
]


@pytest.mark.parametrize(("path", "body"), AGENT_FOUND, ids=[f"agent-{i}" for i in range(len(AGENT_FOUND))])
def test_agent_hostile_bodies_get_4xx(agent_http: Any, path: str, body: bytes) -> None:
    r = _post(agent_http, "POST", path, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
