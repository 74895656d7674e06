"""hub/ingest/_fastlines.c: a batch of decoded telemetry points into line protocol (the reader's loop in C)."""

from collections.abc import Callable
from typing import Any

def build(
    points: list[Any],
    prefixes: dict[tuple[str, bytes], str],
    field_keys: dict[str, str],
    prefix_miss: Callable[[str, bytes], str],
    key_miss: Callable[[str], str],
    last: list[Any],
) -> str | None: ...
