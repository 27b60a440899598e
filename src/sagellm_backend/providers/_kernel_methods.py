"""The kernel half of a provider's API, over its kernel registry.

:class:`ProviderKernelMethods` is shared by the mock and the torch providers, so that
``kernels`` and ``register_kernel`` have one implementation (the mock adds fault injection
in its own ``get_kernel``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sagellm_backend.capability import DType, KernelKind

if TYPE_CHECKING:
    from sagellm_backend.kernels.registry import KernelRegistry


class ProviderKernelMethods:
    """Kernel methods of a provider (a mixin).

    Invariants: the host class sets ``_kernels`` (its registry, with the provider's built-in
    defaults registered as ``builtin``) and has ``check_dtype``.
    """

    _kernels: KernelRegistry

    if TYPE_CHECKING:

        def check_dtype(self, dtype: DType | str) -> DType: ...

    @property
    def kernels(self) -> KernelRegistry:
        """The kernel registry (its kinds are ``capability().supported_kernels``)."""
        return self._kernels

    def register_kernel(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        kind: KernelKind | str | None = None,
        dtypes: Iterable[DType | str] = (),
        replace: bool = False,
        description: str = "",
    ) -> None:
        """Register ``impl`` under ``name`` (a built-in default of that name gives way to it).

        ``kind`` may be a KernelKind or its value; each of ``dtypes`` must be supported here.

        Raises:
            KernelAlreadyRegisteredError: a user kernel holds ``name``; ``replace`` is False.
            UnsupportedDTypeError: ``dtypes`` names a dtype this provider does not support.
            ConfigError: ``kind`` is not a KernelKind.
        """
        self._kernels.register_for(
            name,
            impl,
            check_dtype=self.check_dtype,
            kind=kind,
            dtypes=dtypes,
            replace=replace,
            description=description,
        )
