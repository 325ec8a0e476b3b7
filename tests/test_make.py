"""The Makefile: `make help` (the default target) lists every target with what it does."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_alone_lists_every_target_with_its_description():
    done = subprocess.run(["make", "-s"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    targets = re.findall(r"^([a-z-]+):.*## ", (ROOT / "Makefile").read_text(), re.M)
    assert done.returncode == 0 and [line.split()[0] for line in done.stdout.splitlines()] == targets
    assert len(targets) > 15 and all(len(line.split()) > 2 for line in done.stdout.splitlines())
