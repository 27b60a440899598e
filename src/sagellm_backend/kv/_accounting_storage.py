"""Capacity-only KV storage of the mock provider (re-exported by :mod:`.storage`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagellm_backend._validate import require_instance
from sagellm_backend.capability import DType, parse_dtype
from sagellm_backend.errors import InvalidKVBlockError
from sagellm_backend.kv._storage_base import Pages, _check_pages, _PagedStorage
from sagellm_backend.kv.spec import KVSpec


@dataclass(frozen=True)
class PageRef:
    """What the mock returns for one page of a block (there are no tensors).

    Attributes:
        device: device string of the pool.
        page: page id in that pool.
        num_bytes: bytes of the page.
        dtype: dtype the page is viewed as.
        num_tokens: tokens of ``dtype`` the page holds.
        tag: content tag (changes when the page is written, travels with copies).
    """

    device: str
    page: int
    num_bytes: int
    dtype: DType
    num_tokens: int
    tag: int


@dataclass(frozen=True)
class AccountingPages:
    """Contents read from an :class:`AccountingStorage`: page size plus content tags."""

    page_bytes: int
    tags: tuple[int, ...]


class AccountingStorage(_PagedStorage):
    """Capacity-only storage for the mock provider: no bytes, real page bookkeeping.

    Each page carries an integer content tag: :meth:`stamp` sets fresh tags (a simulated
    write), :meth:`copy_pages` / :meth:`write_pages` copy tags, so a test can check that a
    copy or migration moved the right pages. ``nbytes`` is the capacity it stands for.
    """

    preallocated = False

    def __init__(self, spec: KVSpec, num_pages: int, device: str = "mock:0") -> None:
        super().__init__(spec, num_pages, device)
        self._tags = [0] * num_pages
        self._next_tag = 1
        self.pages_copied = 0

    @property
    def nbytes(self) -> int:
        """Capacity this storage stands for: ``num_pages * spec.page_bytes``."""
        return self.num_pages * self.spec.page_bytes

    def stamp(self, pages: Sequence[int]) -> list[int]:
        """Simulate writing the pages: give each a fresh content tag; return the tags."""
        ids = _check_pages(pages, self.num_pages, "stamp")
        out = []
        for p in ids:
            self._tags[p] = self._next_tag
            out.append(self._next_tag)
            self._next_tag += 1
        return out

    def tags(self, pages: Sequence[int]) -> list[int]:
        """Current content tags of the pages."""
        return [self._tags[p] for p in _check_pages(pages, self.num_pages, "tags")]

    def copy_pages(
        self, src: Pages, dst: Pages, *, tail_tokens: int | None = None, dtype: DType | None = None
    ) -> None:
        """Copy content tags ``src[i] -> dst[i]`` (a partial last page takes the source tag)."""
        s = _check_pages(src, self.num_pages, "copy_pages src")
        d = _check_pages(dst, self.num_pages, "copy_pages dst")
        if len(s) != len(d):
            raise InvalidKVBlockError(f"copy_pages: {len(s)} source pages but {len(d)} targets")
        snapshot = [self._tags[p] for p in s]
        for p, t in zip(d, snapshot, strict=True):
            self._tags[p] = t
        self.pages_copied += len(s)

    def read_pages(self, pages: Sequence[int]) -> AccountingPages:
        """Snapshot of the pages' content tags."""
        ids = _check_pages(pages, self.num_pages, "read_pages")
        return AccountingPages(self.spec.page_bytes, tuple(self._tags[p] for p in ids))

    def write_pages(
        self, pages: Pages, data: Any, *, tail_tokens: int | None = None, dtype: DType | None = None
    ) -> None:
        """Write a snapshot from :meth:`read_pages` of a storage with the same page size."""
        ids = _check_pages(pages, self.num_pages, "write_pages")
        data = require_instance(data, AccountingPages, "write_pages expects AccountingPages")
        if data.page_bytes != self.spec.page_bytes or len(data.tags) != len(ids):
            raise InvalidKVBlockError(
                f"write_pages: data holds {len(data.tags)} pages of {data.page_bytes} bytes, "
                f"target is {len(ids)} pages of {self.spec.page_bytes} bytes"
            )
        for p, t in zip(ids, data.tags, strict=True):
            self._tags[p] = t
        self.pages_copied += len(ids)

    def page_views(self, pages: Sequence[int], dtype: DType | None = None) -> list[PageRef]:
        """One :class:`PageRef` per page (the mock has no tensors)."""
        d = self.spec.dtype if dtype is None else parse_dtype(dtype)
        per_page = self.spec.tokens_per_page(d)
        ids = _check_pages(pages, self.num_pages, "page_views")
        return [
            PageRef(self.device, p, self.spec.page_bytes, d, per_page, self._tags[p]) for p in ids
        ]

    def __repr__(self) -> str:
        return f"AccountingStorage(num_pages={self.num_pages}, device={self.device!r})"
