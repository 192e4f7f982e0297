"""Runs the page's JavaScript unit tests (tests/js/*.test.mjs) with node's built-in runner."""
import subprocess

from conftest import require_binary
from harness import ROOT


def test_sse_parser_unit_tests():
    node = require_binary("node")
    proc = subprocess.run([node, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# fail 0" in proc.stdout and "# pass 0" not in proc.stdout
