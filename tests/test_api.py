"""The public API: lazily imported, every name documented with an example that runs, docs/api.md in sync."""
from pathlib import Path

import pytest

import moelab
from moelab import apidoc

ROOT = Path(__file__).resolve().parents[1]


def test_docs_api_md_is_in_sync():
    assert (ROOT / "docs" / "api.md").read_text() == apidoc.render(), "run: python -m moelab.apidoc"


def test_every_public_name_has_an_example():
    assert set(apidoc.EXAMPLES) == set(moelab.__all__)


@pytest.mark.parametrize("name", moelab.__all__)
def test_example_runs(name):
    env = {n: getattr(moelab, n) for n in moelab.__all__ if n != "hf"} | {"moelab": moelab}
    exec(compile(apidoc.EXAMPLES[name], f"<example {name}>", "exec"), env)  # noqa: S102 - our own examples
