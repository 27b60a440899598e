"""Where the bytes of KV pages live.

Two implementations of one small interface (:class:`KVStorage`), both constructed as
``Storage(spec, num_pages, device)`` so a provider can inject either as its storage factory:

* :class:`AccountingStorage` (mock provider): no K/V bytes, only the same capacity and
  page-range rules as real storage, plus a *content tag* per page that copies/reads/writes
  carry along, so tests can check that a copy or migration really moved page contents.
* :class:`TorchKVStorage` (cpu/cuda providers with torch): one preallocated tensor of shape
  ``[num_layers, 2, num_pages, block_size, num_kv_heads, head_dim]`` in the spec dtype
  (index 0 of the second axis is K, 1 is V). torch is imported only when it is created.
* :class:`HostKVStorage` (cpu provider without torch): one preallocated ``bytearray`` of
  host memory, page-major (page ``p`` is bytes ``[p * page_bytes, (p + 1) * page_bytes)``,
  laid out inside as ``[num_layers, 2, tokens, num_kv_heads, head_dim]``); copies and
  migrations really move the bytes; page views are writable ``memoryview`` objects.

Other dtypes on the same pages (the generic ``kv_block_alloc(num_tokens, dtype)`` API): a
page is ``spec.page_bytes`` bytes whatever the dtype. For a page ``p`` the bytes of each
``(layer, k/v)`` pair are one contiguous run, so reinterpreting every run as ``dtype`` gives
a zero-copy view ``[num_layers, 2, num_pages, tokens_per_page(dtype), kv_heads, head_dim']``
(:meth:`TorchKVStorage.dtype_view`; ``head_dim' = head_dim // 2`` for INT4, which is stored
packed two per byte as ``uint8``). Page copies are byte copies, so they are exact for any
dtype.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sagellm_backend.capability import DType, parse_dtype
from sagellm_backend.errors import InvalidKVBlockError
from sagellm_backend.kv.spec import KVSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "AccountingPages",
    "AccountingStorage",
    "HostKVStorage",
    "HostPages",
    "KVStorage",
    "PageRef",
    "StorageFactory",
    "TorchKVStorage",
    "torch_dtype_of",
]


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
        self,
        src: Sequence[int],
        dst: Sequence[int],
        *,
        tail_tokens: int | None = None,
        dtype: DType | None = None,
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
        self,
        pages: Sequence[int],
        data: Any,
        *,
        tail_tokens: int | None = None,
        dtype: DType | None = None,
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


# --------------------------------------------------------------------------- accounting


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


class AccountingStorage:
    """Capacity-only storage for the mock provider: no bytes, real page bookkeeping.

    Each page carries an integer content tag: :meth:`stamp` sets fresh tags (a simulated
    write), :meth:`copy_pages` / :meth:`write_pages` copy tags, so a test can check that a
    copy or migration moved the right pages. ``nbytes`` is the capacity it stands for.
    """

    preallocated = False

    def __init__(self, spec: KVSpec, num_pages: int, device: str = "mock:0") -> None:
        _check_num_pages(num_pages)
        self.spec = spec
        self.num_pages = num_pages
        self.device = device
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
        self,
        src: Sequence[int],
        dst: Sequence[int],
        *,
        tail_tokens: int | None = None,
        dtype: DType | None = None,
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
        self,
        pages: Sequence[int],
        data: Any,
        *,
        tail_tokens: int | None = None,
        dtype: DType | None = None,
    ) -> None:
        """Write a snapshot from :meth:`read_pages` of a storage with the same page size."""
        ids = _check_pages(pages, self.num_pages, "write_pages")
        if not isinstance(data, AccountingPages):
            raise TypeError(f"write_pages expects AccountingPages, got {type(data).__name__}")
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


# --------------------------------------------------------------------------- host bytes

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


class HostKVStorage:
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
        _check_num_pages(num_pages)
        self.spec = spec
        self.num_pages = num_pages
        self.device = device
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
        self,
        src: Sequence[int],
        dst: Sequence[int],
        *,
        tail_tokens: int | None = None,
        dtype: DType | None = None,
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
        self,
        pages: Sequence[int],
        data: Any,
        *,
        tail_tokens: int | None = None,
        dtype: DType | None = None,
    ) -> None:
        """Overwrite the pages with ``data`` from :meth:`read_pages` of a same-spec storage.

        With ``tail_tokens`` only that many ``dtype`` tokens of each run of the last page are
        written.
        """
        ids = _check_pages(pages, self.num_pages, "write_pages")
        if not isinstance(data, HostPages):
            raise TypeError(f"write_pages expects HostPages, got {type(data).__name__}")
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


# --------------------------------------------------------------------------- torch


def torch_dtype_of(dtype: DType | str) -> tuple[torch.dtype, int]:
    """The torch dtype used to store ``dtype`` and how many elements share one value.

    Returns ``(torch_dtype, pack)``: ``pack`` is 2 for INT4 (two values per ``uint8``) and 1
    otherwise.
    """
    import torch

    d = parse_dtype(dtype)
    table: dict[DType, tuple[torch.dtype, int]] = {
        DType.FP32: (torch.float32, 1),
        DType.FP16: (torch.float16, 1),
        DType.BF16: (torch.bfloat16, 1),
        DType.FP8: (torch.float8_e4m3fn, 1),
        DType.INT8: (torch.int8, 1),
        DType.INT4: (torch.uint8, 2),
    }
    return table[d]


def _reinterpret(data: torch.Tensor, spec: KVSpec, dtype: DType) -> torch.Tensor:
    """View contiguous pages ``[L, 2, P, block_size, H, D']`` of ``spec`` as ``dtype`` tokens.

    Returns ``[L, 2, P, spec.tokens_per_page(dtype), H, D'']`` sharing ``data``'s memory.
    """
    import torch

    if dtype == spec.dtype:
        return data
    tdtype, pack = torch_dtype_of(dtype)
    if spec.head_dim % pack:
        raise ValueError(f"INT4 view needs an even head_dim, got {spec.head_dim}")
    layers, kv, pages = data.shape[:3]
    tokens = spec.tokens_per_page(dtype)
    run = data[0, 0, 0].numel() * data.element_size()
    itemsize = torch.empty((), dtype=tdtype).element_size()
    used = tokens * spec.num_kv_heads * (spec.head_dim // pack) * itemsize
    raw = data.view(torch.uint8).reshape(layers, kv, pages, run)[..., :used]
    return raw.view(tdtype).view(layers, kv, pages, tokens, spec.num_kv_heads, -1)


class TorchKVStorage:
    """Preallocated torch tensor holding every page of a pool.

    ``data`` has shape ``[num_layers, 2, num_pages, block_size, num_kv_heads, head_dim]``
    (``head_dim // 2`` of ``uint8`` for INT4). For a fixed ``(layer, k/v)`` the pages are
    contiguous, so :meth:`layer_kv` returns flat-slot views and the slot of token ``i`` of a
    sequence is ``block_table[i // block_size] * block_size + i % block_size``.

    Args:
        spec: KV geometry and dtype.
        num_pages: pages to allocate (``>= 1``).
        device: torch device string.
        zero: fill with zeros instead of leaving memory uninitialised.
    """

    preallocated = True

    def __init__(
        self, spec: KVSpec, num_pages: int, device: str = "cpu", *, zero: bool = False
    ) -> None:
        import torch

        _check_num_pages(num_pages)
        tdtype, pack = torch_dtype_of(spec.dtype)
        if spec.head_dim % pack:
            raise ValueError(f"INT4 KV needs an even head_dim, got {spec.head_dim}")
        self.spec = spec
        self.num_pages = num_pages
        self.torch_dtype = tdtype
        shape = (
            spec.num_layers,
            2,
            num_pages,
            spec.block_size,
            spec.num_kv_heads,
            spec.head_dim // pack,
        )
        alloc = torch.zeros if zero else torch.empty
        self.data: torch.Tensor = alloc(shape, dtype=tdtype, device=device)
        self.device = str(self.data.device)
        self._views: dict[DType, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor (``num_pages * spec.page_bytes``)."""
        return int(self.data.numel() * self.data.element_size())

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer``, each a contiguous view ``[num_pages * block_size, heads, dim]``."""
        if not 0 <= layer < self.spec.num_layers:
            raise IndexError(f"layer {layer} out of range (0..{self.spec.num_layers - 1})")
        n, b = self.num_pages, self.spec.block_size
        rest = self.data.shape[4:]
        return (
            self.data[layer, 0].view(n * b, *rest),
            self.data[layer, 1].view(n * b, *rest),
        )

    def dtype_view(self, dtype: DType | str | None = None) -> torch.Tensor:
        """Zero-copy view of all pages as ``dtype``: ``[L, 2, N, tokens_per_page, H, D']``.

        ``tokens_per_page = spec.tokens_per_page(dtype)``; a page whose size is not a whole
        number of ``dtype`` tokens leaves its last bytes out of the view.
        """
        d = self.spec.dtype if dtype is None else parse_dtype(dtype)
        if d == self.spec.dtype:
            return self.data
        cached = self._views.get(d)
        if cached is None:
            cached = self._views[d] = _reinterpret(self.data, self.spec, d)
        return cached

    def _index(self, pages: Sequence[int], what: str) -> torch.Tensor:
        import torch

        ids = _check_pages(pages, self.num_pages, what)
        return torch.tensor(ids, dtype=torch.long, device=self.data.device)

    def copy_pages(
        self,
        src: Sequence[int],
        dst: Sequence[int],
        *,
        tail_tokens: int | None = None,
        dtype: DType | None = None,
    ) -> None:
        """Copy pages ``src[i] -> dst[i]`` (all layers, K and V); ``dst`` must be distinct.

        With ``tail_tokens`` only that many ``dtype`` tokens of the last page are copied.
        """
        s, d = _check_copy(src, dst, self.num_pages)
        whole, tail, dt = _split_tail(self.spec, len(s), tail_tokens, dtype)
        if whole:
            si = self._index(s[:whole], "copy_pages src")
            di = self._index(d[:whole], "copy_pages dst")
            self.data.index_copy_(2, di, self.data.index_select(2, si))
        if tail is not None and s[-1] != d[-1]:
            view = self.dtype_view(dt)
            view[:, :, d[-1], :tail] = view[:, :, s[-1], :tail]

    def read_pages(self, pages: Sequence[int]) -> torch.Tensor:
        """Copy of the pages: ``[num_layers, 2, len(pages), block_size, heads, dim]``."""
        return self.data.index_select(2, self._index(pages, "read_pages"))

    def write_pages(
        self,
        pages: Sequence[int],
        data: Any,
        *,
        tail_tokens: int | None = None,
        dtype: DType | None = None,
    ) -> None:
        """Overwrite the pages with ``data`` shaped like :meth:`read_pages` (any device).

        With ``tail_tokens`` only that many ``dtype`` tokens of the last page are written.
        """
        import torch

        if not isinstance(data, torch.Tensor):
            raise TypeError(f"write_pages expects a torch.Tensor, got {type(data).__name__}")
        ids = _check_pages(pages, self.num_pages, "write_pages")
        if len(set(ids)) != len(ids):
            raise InvalidKVBlockError("write_pages: target pages must be distinct")
        expected = list(self.data.shape)
        expected[2] = len(ids)
        if list(data.shape) != expected or data.dtype != self.data.dtype:
            raise InvalidKVBlockError(
                f"write_pages: data is {tuple(data.shape)} {data.dtype}, "
                f"expected {tuple(expected)} {self.data.dtype}"
            )
        data = data.to(self.data.device)
        whole, tail, dt = _split_tail(self.spec, len(ids), tail_tokens, dtype)
        if whole:
            idx = self._index(ids[:whole], "write_pages")
            self.data.index_copy_(2, idx, data[:, :, :whole])
        if tail is not None:
            last = _reinterpret(data[:, :, whole:].contiguous(), self.spec, dt)
            self.dtype_view(dt)[:, :, ids[-1], :tail] = last[:, :, 0, :tail]

    def page_views(self, pages: Sequence[int], dtype: DType | None = None) -> list[torch.Tensor]:
        """Writable views, one per page: ``[num_layers, 2, tokens_per_page(dtype), H, D']``."""
        view = self.dtype_view(dtype)
        return [view[:, :, p] for p in _check_pages(pages, self.num_pages, "page_views")]

    def __repr__(self) -> str:
        return (
            f"TorchKVStorage(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, "
            f"device={self.device!r})"
        )
