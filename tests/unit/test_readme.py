"""The README's library snippet runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def library_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Library use", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's 'Library use' section has no python block"
    return match.group(1)


@pytest.mark.slow
def test_library_snippet_runs_and_picks_a_model(tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(library_snippet())
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    name, score = done.stdout.split()[-2:]
    assert name in {"hgb", "logreg"}
    assert 0.3 < float(score) <= 1.0
