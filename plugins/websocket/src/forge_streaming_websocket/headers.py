"""A connection's request headers in one bytes object, for as long as the connection lives.

uvicorn gives the ASGI scope a list of ``(name, value)`` tuples of bytes:
two bytes objects and a tuple per header, about 1 KB for a browser's
request. An open WebSocket keeps its request (hooks may read it until the
end), so the room endpoint packs that list into one bytes object and
decodes on lookup, which happens a few times per connection (auth, origin,
cookies), never per message.

:class:`PackedHeaderList` takes the list's place in the scope (an ASGI
header iterable, also a sequence), and the kernel's request reads it as it
reads any scope's header list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import overload

_SEP = b"\x00"  # never in a name or value: websockets' HTTP parser refuses control characters there


class PackedHeaderList(Sequence[tuple[bytes, bytes]]):
    """``[(name, value), ...]`` stored as ``name\\0value\\0name\\0value``."""

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    @classmethod
    def pack(cls, headers: Iterable[tuple[bytes, bytes]]) -> PackedHeaderList | None:
        """The packed form of ``headers``, or None when a name or value cannot be packed (has a NUL)."""
        parts: list[bytes] = []
        for name, value in headers:
            if _SEP in name or _SEP in value:
                return None
            parts.append(bytes(name))
            parts.append(bytes(value))
        return cls(_SEP.join(parts) if parts else b"")

    def _pairs(self) -> list[tuple[bytes, bytes]]:
        if not self._packed:
            return []
        parts = self._packed.split(_SEP)
        return list(zip(parts[::2], parts[1::2], strict=True))

    def __len__(self) -> int:
        return self._packed.count(_SEP) // 2 + 1 if self._packed else 0

    @overload
    def __getitem__(self, index: int) -> tuple[bytes, bytes]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[bytes, bytes]]: ...

    def __getitem__(self, index: int | slice) -> tuple[bytes, bytes] | list[tuple[bytes, bytes]]:
        return self._pairs()[index]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._pairs())

    def __reversed__(self) -> Iterator[tuple[bytes, bytes]]:
        return reversed(self._pairs())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedHeaderList):
            return self._packed == other._packed
        if isinstance(other, (list, tuple)):
            return self._pairs() == [tuple(pair) for pair in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like the list it stands for

    def __repr__(self) -> str:
        return repr(self._pairs())
