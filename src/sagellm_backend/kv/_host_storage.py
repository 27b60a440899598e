"""Preallocated host-memory KV storage (cpu without torch; re-exported by :mod:`.storage`)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagellm_backend._validate import require_instance
from sagellm_backend.capability import DType, parse_dtype
from sagellm_backend.errors import InvalidKVBlockError
from sagellm_backend.kv._storage_base import (
    Pages,
    _check_copy,
    _check_pages,
    _PagedStorage,
    _split_tail,
)
from sagellm_backend.kv.spec import KVSpec

#: ``memoryview`` format of each dtype's elements on the host. ``memoryview`` has no
#: half-precision format, so FP16 and BF16 elements are their raw 16-bit patterns
#: (``"H"``; ``struct.unpack("e", ...)`` reads an FP16 value); FP8 and packed INT4 are raw
#: bytes.
HOST_FORMATS: dict[DType, str] = {
    DType.FP32: "f",
    DType.FP16: "H",
    DType.BF16: "H",
    DType.FP8: "B",
    DType.INT8: "b",
    DType.INT4: "B",
}


@dataclass(frozen=True)
class HostPages:
    """Contents read from a :class:`HostKVStorage`: whole pages, concatenated."""

    page_bytes: int
    data: bytes

    @property
    def num_pages(self) -> int:
        """Pages held (``len(data) // page_bytes``)."""
        return len(self.data) // self.page_bytes


class HostKVStorage(_PagedStorage):
    """Preallocated host memory holding every page of a pool (no torch needed).

    Layout: page-major. Page ``p`` is the ``page_bytes`` bytes at ``p * page_bytes``; inside
    it, the ``2 * num_layers`` runs of ``page_bytes / (2 * num_layers)`` bytes are
    ``(layer, k/v)`` in order, and token ``t`` of a run starts at
    ``t * bytes_per_token_of(dtype) / (2 * num_layers)``. So a page viewed as ``dtype`` is
    ``[num_layers, 2, tokens_per_page(dtype), num_kv_heads, head_dim']`` -- the same shape
    as a :class:`TorchKVStorage` page view -- and a page copy is one ``memmove``.

    Invariants: ``nbytes == num_pages * spec.page_bytes`` bytes exist from construction
    (zero-filled); every copy/write moves the bytes (no tags, no sharing).

    Args:
        spec: KV geometry and dtype.
        num_pages: pages to allocate (``>= 1``).
        device: device string (``"cpu"``).
    """

    preallocated = True

    def __init__(self, spec: KVSpec, num_pages: int, device: str = "cpu") -> None:
        super().__init__(spec, num_pages, device)
        self._page = spec.page_bytes
        self._runs = 2 * spec.num_layers
        self._run = self._page // self._runs
        self.buffer = bytearray(num_pages * self._page)
        self._mv = memoryview(self.buffer)

    @property
    def nbytes(self) -> int:
        """Bytes of host memory held: ``num_pages * spec.page_bytes``."""
        return len(self.buffer)

    def _token_bytes(self, dtype: DType) -> int:
        """Bytes of one token of ``dtype`` inside one ``(layer, k/v)`` run."""
        return self.spec.bytes_per_token_of(dtype) // self._runs

    def _tail(self, n: int, tail_tokens: int | None, dtype: DType | None) -> tuple[int, int]:
        """(whole pages, bytes per run of the partial last page, 0 if none)."""
        whole, tail, d = _split_tail(self.spec, n, tail_tokens, dtype)
        return whole, 0 if tail is None else tail * self._token_bytes(d)

    def _copy_tail(self, src: memoryview | bytes, dst_page: int, nbytes: int) -> None:
        """Copy the first ``nbytes`` of each run of page ``src`` into page ``dst_page``."""
        base = dst_page * self._page
        for r in range(self._runs):
            off = r * self._run
            self._mv[base + off : base + off + nbytes] = src[off : off + nbytes]

    def copy_pages(
        self, src: Pages, dst: Pages, *, tail_tokens: int | None = None, dtype: DType | None = None
    ) -> None:
        """Copy pages ``src[i] -> dst[i]`` byte for byte; ``dst`` must be distinct.

        Sources are read before any target is written (a chain ``1->2, 2->3`` copies the
        old page 2). With ``tail_tokens`` only that many ``dtype`` tokens of each run of the
        last page are copied; the rest of that target page is kept.
        """
        s, d = _check_copy(src, dst, self.num_pages)
        self.write_pages(d, self.read_pages(s), tail_tokens=tail_tokens, dtype=dtype)

    def read_pages(self, pages: Sequence[int]) -> HostPages:
        """A copy of the pages' bytes, in order."""
        ids = _check_pages(pages, self.num_pages, "read_pages")
        pb, mv = self._page, self._mv
        return HostPages(pb, b"".join(mv[p * pb : (p + 1) * pb] for p in ids))

    def write_pages(
        self, pages: Pages, data: Any, *, tail_tokens: int | None = None, dtype: DType | None = None
    ) -> None:
        """Overwrite the pages with ``data`` from :meth:`read_pages` of a same-spec storage.

        With ``tail_tokens`` only that many ``dtype`` tokens of each run of the last page are
        written.
        """
        ids = _check_pages(pages, self.num_pages, "write_pages")
        data = require_instance(data, HostPages, "write_pages expects HostPages")
        if len(set(ids)) != len(ids):
            raise InvalidKVBlockError("write_pages: target pages must be distinct")
        if data.page_bytes != self._page or data.num_pages != len(ids):
            raise InvalidKVBlockError(
                f"write_pages: data holds {data.num_pages} pages of {data.page_bytes} bytes, "
                f"target is {len(ids)} pages of {self._page} bytes"
            )
        whole, tail_bytes = self._tail(len(ids), tail_tokens, dtype)
        pb, mv, raw = self._page, self._mv, data.data
        for i in range(whole):
            p = ids[i]
            mv[p * pb : (p + 1) * pb] = raw[i * pb : (i + 1) * pb]
        if tail_bytes:
            self._copy_tail(memoryview(raw)[whole * pb : (whole + 1) * pb], ids[-1], tail_bytes)

    def page_views(self, pages: Sequence[int], dtype: DType | None = None) -> list[memoryview]:
        """Writable views, one per page.

        When the page holds a whole number of ``dtype`` tokens per run the view is
        ``[num_layers, 2, tokens_per_page(dtype), num_kv_heads, head_dim']`` in the format
        of :data:`HOST_FORMATS` (``head_dim' = head_dim // 2`` for INT4); otherwise it is the
        page's raw bytes (format ``"B"``).
        """
        d = self.spec.dtype if dtype is None else parse_dtype(dtype)
        ids = _check_pages(pages, self.num_pages, "page_views")
        tokens = self.spec.tokens_per_page(d)
        tok = self._token_bytes(d)
        fmt: Any = HOST_FORMATS[d]  # a str; memoryview.cast's overloads want literals
        itemsize = struct.calcsize(fmt)
        heads = self.spec.num_kv_heads
        width = tok // (heads * itemsize) if tok % (heads * itemsize) == 0 else 0
        shape = [self.spec.num_layers, 2, tokens, heads, width]
        exact = width > 0 and tokens * tok == self._run
        pb, mv = self._page, self._mv
        out = []
        for p in ids:
            page = mv[p * pb : (p + 1) * pb]
            out.append(page.cast(fmt, shape=shape) if exact else page)
        return out

    def __repr__(self) -> str:
        return (
            f"HostKVStorage(num_pages={self.num_pages}, page_bytes={self._page}, "
            f"device={self.device!r})"
        )
