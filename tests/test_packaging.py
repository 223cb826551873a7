"""moelab as an installed package: built as a wheel, installed elsewhere, `moelab bench` runs from it and writes
under the current folder, never into the installed package."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_runs_from_a_wheel_install_and_writes_outside_the_package(tmp_path):
    whl, site, work, src = tmp_path / "whl", tmp_path / "site", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):  # built from a copy: a build writes build/ and *.egg-info
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "moelab", src / "moelab", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(whl),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(whl.glob("moelab-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    before = sorted(p.relative_to(site) for p in site.rglob("*") if "__pycache__" not in p.parts)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import moelab; print(moelab.__file__)"], env=env, cwd=work,
                           capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert Path(where).is_relative_to(site)  # the wheel's copy, not the source tree
    out = subprocess.run([sys.executable, "-m", "moelab", "bench", "--quick", "--no-hf", "--rounds", "2",
                          "--budget", "1"], env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((work / "benchmarks" / "results" / "bench_moe_quick.json").read_text())
    assert res["quick"] and res["shapes"][0]["fwd"]["moelab_over_dense"] > 0
    assert "not comparable" in out.stdout
    assert "warn" not in (out.stdout + out.stderr).lower()   # no profiler or allocator noise
    after = sorted(p.relative_to(site) for p in site.rglob("*") if "__pycache__" not in p.parts)
    assert after == before
