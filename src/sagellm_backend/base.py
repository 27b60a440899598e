"""The provider contract: BackendProvider, Stream, Event (Protocols) and KVBlock.

These are structural types (:class:`typing.Protocol`, ``runtime_checkable``): a hardware
plugin does not inherit from anything, it implements the methods, and
``isinstance(obj, BackendProvider)`` checks that it has them.

The semantics every implementation must keep (the conformance kit in
:mod:`sagellm_backend.testing` checks them):

* ``capability()`` describes what the provider really does, and the provider enforces it:
  a dtype not in ``supported_dtypes`` raises :class:`~sagellm_backend.errors.UnsupportedDTypeError`
  (a ``ValueError``); a collective with ``has_collective=False`` raises
  :class:`~sagellm_backend.errors.CapabilityNotSupportedError` (a ``NotImplementedError``).
* ``kv_block_alloc`` either returns a block whose pages are all reserved or raises
  :class:`~sagellm_backend.errors.KVCacheExhaustedError` leaving the pool unchanged.
  ``kv_block_free`` of a block twice, or of a block from another provider, raises
  :class:`~sagellm_backend.errors.InvalidKVBlockError` and leaves the pool unchanged.
* ``Event.elapsed_ms(start)`` is real elapsed wall/device time between two recorded events.
* ``all_reduce`` works in place; ``all_gather`` returns a new tensor. With no process group
  both have single-rank (identity) semantics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from sagellm_backend.capability import CapabilityDescriptor, DType

__all__ = ["BackendProvider", "Event", "KVBlock", "Stream"]


@runtime_checkable
class Event(Protocol):
    """A point in a stream's timeline that can be waited on and timed."""

    def synchronize(self) -> None:
        """Block until the work recorded before this event has finished."""
        ...

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds elapsed from ``start`` to this event (both must be recorded)."""
        ...


@runtime_checkable
class Stream(Protocol):
    """An ordered queue of device work."""

    def synchronize(self) -> None:
        """Block until all work queued on this stream has finished."""
        ...

    def record_event(self, event: Event) -> None:
        """Record ``event`` at the current end of this stream."""
        ...


@dataclass(frozen=True)
class KVBlock:
    """A KV-cache allocation handed out by :meth:`BackendProvider.kv_block_alloc`.

    Attributes:
        handle: provider-unique id of this allocation; never reused while it is live.
        num_tokens: tokens the block was allocated for (``> 0``).
        dtype: element type of the K/V data.
        device: device string where the data lives (``"cpu"``, ``"cuda:0"``, ``"mock"``).
        pages: ids of the fixed-size pool pages that back the block, in token order.
        owner: id of the provider instance that allocated it (foreign blocks are refused).
        num_bytes: bytes of pool memory reserved for the block (whole pages).
    """

    handle: int
    num_tokens: int
    dtype: DType
    device: str
    pages: tuple[int, ...] = ()
    owner: str = ""
    num_bytes: int = 0


@runtime_checkable
class BackendProvider(Protocol):
    """The hardware abstraction every sageLLM backend implements (0.1.1.2 contract)."""

    def capability(self) -> CapabilityDescriptor:
        """Describe what this provider supports; the provider enforces what it reports."""
        ...

    def create_stream(self) -> Stream:
        """Create a new stream on the provider's device."""
        ...

    def create_event(self) -> Event:
        """Create a new timing event."""
        ...

    def all_reduce(self, tensor: Any, op: str) -> None:
        """Reduce ``tensor`` in place across ranks; ``op`` in sum/avg/max/min/product."""
        ...

    def all_gather(self, tensor: Any) -> Any:
        """Gather ``tensor`` from every rank and return the concatenation (rank order)."""
        ...

    def kv_block_alloc(self, num_tokens: int, dtype: DType) -> KVBlock:
        """Reserve KV memory for ``num_tokens`` tokens of ``dtype``."""
        ...

    def kv_block_free(self, block: KVBlock) -> None:
        """Release a block returned by :meth:`kv_block_alloc` (exactly once)."""
        ...

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        """Copy the K/V data of ``src`` into ``dst`` (same dtype, ``dst`` large enough)."""
        ...

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        """Move ``block``'s data to ``target_device``; the source block is released."""
        ...

    def memory_stats(self) -> dict[str, int]:
        """Memory figures in bytes (at least ``allocated``, ``peak``, ``total``)."""
        ...

    def clear_cache(self) -> None:
        """Release cached memory that nothing references (allocator cache, idle KV pages)."""
        ...

    def register_kernel(self, name: str, impl: Callable[..., Any]) -> None:
        """Register a kernel implementation under ``name``."""
        ...

    def get_kernel(self, name: str) -> Callable[..., Any]:
        """Return the kernel registered under ``name`` (``KeyError`` if none)."""
        ...
