"""The long fuzz run: the same targets as tests/hardening/test_fuzz_parsers.py, many more examples.

Two engines:

* hypothesis (default): runs the fuzz test file under pytest with every target's example count
  raised, including the HTTP request bodies of the agent and the controller::

      python tools/fuzz_long.py                         # 5,000 examples per target
      python tools/fuzz_long.py --examples 50000 -k bundle

* atheris (``pip install atheris``): coverage-guided libFuzzer mutation of the raw bytes of one
  byte-level target, seeded with valid inputs; arguments after ``--`` go to libFuzzer::

      python tools/fuzz_long.py --atheris messages.decode -- -max_total_time=600
      python tools/fuzz_long.py --atheris bundle.BundleReader -- -max_total_time=3600 -jobs=2

Run from the repository root. Exit status 0: nothing found; otherwise the failing input is
printed (hypothesis) or written to ``crash-*`` (atheris). Add every finding to REGRESSIONS in
the test file before fixing it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = "tests/hardening/test_fuzz_parsers.py"
# Targets whose input is bytes or text, which atheris can mutate directly.
ATHERIS_TARGETS = ("messages.decode", "manifest.parse_manifest", "signing.verify_manifest", "bundle.BundleReader",
                   "profile.load_profile_file", "topics.Topics.parse", "topics.check_id")


class LongRun:
    """pytest plugin: raise the example counts of the fuzz tests before they run."""

    def __init__(self, examples: int, http_examples: int) -> None:
        self.examples, self.http_examples = examples, http_examples

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        """Set the counts on the test module pytest actually imported."""
        for item in items:
            module = getattr(item, "module", None)
            if module is not None and hasattr(module, "CI_EXAMPLES"):
                module.CI_EXAMPLES = self.examples
                module.HTTP_EXAMPLES = self.http_examples


def run_hypothesis(examples: int, http_examples: int, keyword: str | None) -> int:
    """Run the fuzz tests with more examples; return pytest's exit code."""
    import pytest

    args = [TEST_FILE, "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--timeout=0"]
    if keyword:
        args += ["-k", keyword]
    return int(pytest.main(args, plugins=[LongRun(examples, http_examples)]))


def run_atheris(name: str, libfuzzer_args: list[str]) -> int:
    """Fuzz one byte-level target with atheris (coverage-guided); never returns on success."""
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    if name not in ATHERIS_TARGETS:
        print(f"unknown atheris target {name!r}; choose from: {', '.join(ATHERIS_TARGETS)}", file=sys.stderr)
        return 2
    with atheris.instrument_imports(include=["edge"]):
        import tests.hardening.test_fuzz_parsers as fuzz

    target = fuzz.TARGETS[name]
    as_text = name.startswith(("profile.", "topics."))

    def one_input(data: bytes) -> None:
        target.check(data.decode("utf-8", "replace") if as_text else data)

    corpus = ROOT / "build" / "fuzz-corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(_seeds(fuzz, name)):
        (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup([sys.argv[0], str(corpus), *libfuzzer_args], one_input)
    atheris.Fuzz()
    return 0


def _seeds(fuzz: Any, name: str) -> list[bytes]:
    if name == "messages.decode":
        return list(fuzz.envelopes())
    if name in ("manifest.parse_manifest", "signing.verify_manifest"):
        return [fuzz.valid_manifest()]
    if name == "bundle.BundleReader":
        return [fuzz.valid_bundle()]
    if name == "profile.load_profile_file":
        return [p.read_bytes() for p in sorted((ROOT / "device_profiles").glob("*.yaml"))]
    return [b"edge/v1/f1/dev-a/status", b"edge/v1/f1/dev-a/cmd/deploy"]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen engine."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="hypothesis examples per parser target")
    parser.add_argument("--http-examples", type=int, default=1000, help="hypothesis examples per HTTP route")
    parser.add_argument("-k", dest="keyword", help="run only the tests matching this pytest -k expression")
    parser.add_argument("--atheris", metavar="TARGET", help=f"fuzz one target with atheris: {', '.join(ATHERIS_TARGETS)}")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.atheris:
        return run_atheris(args.atheris, extra)
    return run_hypothesis(args.examples, args.http_examples, args.keyword)


if __name__ == "__main__":
    sys.exit(main())
