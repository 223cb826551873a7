"""The README's quick start runs as written."""
import re
import subprocess
import sys
from pathlib import Path


def test_readme_quick_start_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    assert text.startswith("# moelab\n\n```\nmake demo") and "make test" in text.split("```")[1]
    quick = re.search(r"## Quick start \(Python\)\n```python\n(.*?)```", text, re.DOTALL)
    assert quick is not None
    out = subprocess.run([sys.executable, "-c", quick.group(1)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([128, 2])" in out.stdout
