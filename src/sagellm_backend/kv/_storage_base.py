"""The :class:`KVStorage` interface of :mod:`sagellm_backend.kv.storage` and its checks.

Internal: the page-id/argument checks every storage shares (each raises
:class:`~sagellm_backend.errors.InvalidKVBlockError` or ValueError naming the bad value).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from sagellm_backend.capability import DType, parse_dtype
from sagellm_backend.errors import InvalidKVBlockError
from sagellm_backend.kv.spec import KVSpec

#: Page ids of one pool, in order.
Pages = Sequence[int]


@runtime_checkable
class KVStorage(Protocol):
    """Backing store of a pool's pages (same page ids as the :class:`BlockPool`).

    Attributes:
        spec: the KV geometry; one page is ``spec.page_bytes`` bytes.
        num_pages: pages it holds.
        device: device string of the data (``"cpu"``, ``"cuda:0"``, ``"mock:0"``).
    """

    spec: KVSpec
    num_pages: int
    device: str

    @property
    def nbytes(self) -> int:
        """Bytes of page storage (``num_pages * spec.page_bytes``)."""
        ...

    @property
    def preallocated(self) -> bool:
        """Whether the bytes exist now (torch) rather than only being accounted (mock)."""
        ...

    def copy_pages(
        self, src: Pages, dst: Pages, *, tail_tokens: int | None = None, dtype: DType | None = None
    ) -> None:
        """Copy pages ``src[i]`` into ``dst[i]`` (same storage).

        With ``tail_tokens``, only the first ``tail_tokens`` tokens (of ``dtype``, default
        the spec dtype) of the last page are copied; the rest of that target page is kept.
        """
        ...

    def read_pages(self, pages: Sequence[int]) -> Any:
        """Return a copy of the pages' contents, in order (for :meth:`write_pages`)."""
        ...

    def write_pages(
        self, pages: Pages, data: Any, *, tail_tokens: int | None = None, dtype: DType | None = None
    ) -> None:
        """Overwrite the pages with ``data`` from :meth:`read_pages` of a same-spec storage.

        ``tail_tokens``/``dtype`` limit the write of the last page as in :meth:`copy_pages`.
        """
        ...

    def page_views(self, pages: Sequence[int], dtype: DType | None = None) -> list[Any]:
        """One handle per page for callers that read/write a block's K/V directly."""
        ...


#: ``factory(spec, num_pages, device) -> KVStorage``; both storage classes qualify.
StorageFactory = Any


def _check_pages(pages: Sequence[int], num_pages: int, what: str) -> list[int]:
    out = list(pages)
    for p in out:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < num_pages:
            raise InvalidKVBlockError(
                f"{what}: page id {p!r} is out of range (valid: 0..{num_pages - 1})"
            )
    return out


def _check_copy(
    src: Sequence[int], dst: Sequence[int], num_pages: int
) -> tuple[list[int], list[int]]:
    """Validated ``(src, dst)`` page lists of a copy: equal lengths, distinct targets."""
    if len(src) != len(dst):
        raise InvalidKVBlockError(f"copy_pages: {len(src)} source pages but {len(dst)} targets")
    if len(set(dst)) != len(dst):
        raise InvalidKVBlockError("copy_pages: target pages must be distinct")
    return (
        _check_pages(src, num_pages, "copy_pages src"),
        _check_pages(dst, num_pages, "copy_pages dst"),
    )


def _split_tail(
    spec: KVSpec, n: int, tail_tokens: int | None, dtype: DType | None
) -> tuple[int, int | None, DType]:
    """Split ``n`` pages into (whole pages, tokens of a partial last page or None, dtype).

    ``dtype`` defaults to the spec dtype; ``tail_tokens`` must be in
    ``1..spec.tokens_per_page(dtype)`` (a full last page counts as whole).
    """
    d = spec.dtype if dtype is None else parse_dtype(dtype)
    if tail_tokens is None or n == 0:
        return n, None, d
    per_page = spec.tokens_per_page(d)
    if not 0 < tail_tokens <= per_page:
        raise InvalidKVBlockError(f"tail_tokens must be in 1..{per_page}, got {tail_tokens}")
    if tail_tokens == per_page:
        return n, None, d
    return n - 1, tail_tokens, d


def _check_num_pages(num_pages: int) -> None:
    if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
        raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")


class _PagedStorage:
    """The attributes every storage starts from: ``spec``, ``num_pages`` and ``device``.

    Args:
        spec: KV geometry and dtype.
        num_pages: pages the storage holds (checked: an int ``>= 1``).
        device: device string of the data.

    Raises:
        ValueError: ``num_pages`` is not a positive integer.
    """

    def __init__(self, spec: KVSpec, num_pages: int, device: str) -> None:
        _check_num_pages(num_pages)
        self.spec = spec
        self.num_pages = num_pages
        self.device = device
