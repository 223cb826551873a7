"""A progress bar for long loops (rich's `track` on stderr, shown only on a terminal, cleared when done)."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    """`items` one by one, with a transient bar on stderr when it is a terminal (never in logs or tests)."""
    yield from track(items, description=description, total=total, transient=True, console=Console(stderr=True),
                     disable=not sys.stderr.isatty())
