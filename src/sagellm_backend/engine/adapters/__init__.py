"""Adapters for third-party inference engines (0.1.1.2 module layout).

:mod:`.vllm` (:class:`~.vllm.VLLMAdapter`) and :mod:`.lmdeploy`
(:class:`~.lmdeploy.LMDeployAdapter`) import without their third-party package; using one
(``start()``) where the package is missing raises
:class:`~sagellm_backend.errors.DependencyMissingError` with the pip command. They are not
registered with :class:`~sagellm_backend.engine.factory.EngineFactory`.
"""

from __future__ import annotations

__all__: list[str] = []
