"""Choices read from a fuzzer's bytes, for the structured fuzz targets (requests.py, targets.py)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ByteReader"]


class ByteReader:
    """Reads choices from the fuzzer's bytes, in order (zeros once they run out)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def byte(self) -> int:
        if self.position >= len(self.data):
            return 0
        value = self.data[self.position]
        self.position += 1
        return value

    def pick(self, options: Sequence[object]) -> object:
        return options[self.byte() % len(options)]

    def chance(self, out_of: int) -> bool:
        """True about once in ``out_of`` (never once the bytes run out)."""
        return self.byte() % out_of == out_of - 1
