"""KV storage in one preallocated torch tensor (re-exported by :mod:`.storage`).

torch is imported only when a storage is created or a helper is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    import torch


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


class TorchKVStorage(_PagedStorage):
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

        super().__init__(spec, num_pages, device)
        tdtype, pack = torch_dtype_of(spec.dtype)
        if spec.head_dim % pack:
            raise ValueError(f"INT4 KV needs an even head_dim, got {spec.head_dim}")
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
        self.device = str(self.data.device)  # normalised by torch ("cuda" -> "cuda:0")
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
        self, src: Pages, dst: Pages, *, tail_tokens: int | None = None, dtype: DType | None = None
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
        self, pages: Pages, data: Any, *, tail_tokens: int | None = None, dtype: DType | None = None
    ) -> None:
        """Overwrite the pages with ``data`` shaped like :meth:`read_pages` (any device).

        With ``tail_tokens`` only that many ``dtype`` tokens of the last page are written.
        """
        import torch

        data = require_instance(data, torch.Tensor, "write_pages expects a torch.Tensor")
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
