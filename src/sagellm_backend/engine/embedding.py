"""EmbeddingEngine: sentence embeddings with sentence-transformers (extra ``embedding``).

The 0.1.1.2 API is kept: :class:`EmbeddingEngineConfig` (``model_id``, ``device``,
``batch_size``, ``max_length``, ``normalize``, ``trust_remote_code``) and
:class:`EmbeddingEngine` with ``setup()``, ``encode(text | texts)``,
``encode_batch(texts, show_progress)``, ``dimension``, ``is_ready``, ``teardown()``,
``is_available()`` and ``backend_type()``.

Invariants:
    * Importing this module imports neither torch nor sentence-transformers; ``setup()``
      does, and a missing package raises
      :class:`~sagellm_backend.errors.DependencyMissingError` with the pip command.
    * ``device="auto"`` asks the provider layer (``sagellm_backend.providers.cuda``) whether
      CUDA can be used; this module never calls the CUDA runtime itself.
    * ``encode(text)`` returns one vector, ``encode(texts)`` one vector per text in order;
      with ``normalize=True`` every vector has unit L2 norm; results do not depend on how
      the texts are batched (up to float rounding).

Example:
    >>> engine = EmbeddingEngine(EmbeddingEngineConfig(model_id="/path/to/all-MiniLM-L6-v2"))
    >>> engine.setup()  # doctest: +SKIP
    >>> len(engine.encode("hello"))  # doctest: +SKIP
    384
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any, overload

from sagellm_backend.errors import BackendNotAvailableError, ConfigError, DependencyMissingError

__all__ = ["EmbeddingEngine", "EmbeddingEngineConfig"]

logger = logging.getLogger(__name__)

_PIP_HINT = "pip install 'isagellm-backend[embedding]'  (sentence-transformers and torch)"
_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EmbeddingEngineConfig:
    """Configuration of :class:`EmbeddingEngine`.

    Attributes:
        model_id: local model directory or hub id (sentence-transformers format).
        device: ``"auto"`` (cuda when the provider layer says it is usable, else cpu),
            ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: texts per forward pass (``> 0``).
        max_length: longest input in tokens; longer inputs are truncated (``> 0``; capped
            at the model's own limit).
        normalize: return unit-length vectors.
        trust_remote_code: allow model code from the model repository.
    """

    model_id: str
    device: str = "auto"
    batch_size: int = 32
    max_length: int = 512
    normalize: bool = True
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ConfigError(
                f"EmbeddingEngineConfig.model_id must be a non-empty string, got {self.model_id!r}"
            )
        dev = self.device
        if not isinstance(dev, str) or not (
            dev in _DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit())
        ):
            raise ConfigError(
                f"EmbeddingEngineConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                f"got {dev!r}"
            )
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"EmbeddingEngineConfig.{name} must be an integer > 0, got {value!r}"
                )
        for name in ("normalize", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"EmbeddingEngineConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )


def _cuda_usable(device: str) -> str | None:
    """None when ``device`` (cuda / cuda:N) can be used, else why not (provider layer)."""
    cuda = importlib.import_module("sagellm_backend.providers.cuda")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    reason: str | None = cuda.unavailable_reason(index)
    return reason


class EmbeddingEngine:
    """Sentence-embedding engine on sentence-transformers (see the module docstring)."""

    def __init__(self, config: EmbeddingEngineConfig) -> None:
        if not isinstance(config, EmbeddingEngineConfig):
            raise ConfigError(
                f"EmbeddingEngine needs an EmbeddingEngineConfig, got {type(config).__name__}"
            )
        self.config = config
        self._model: Any = None
        self._device: str | None = None
        self._dimension: int | None = None

    # ------------------------------------------------------------------ class info
    @classmethod
    def backend_type(cls) -> str:
        """Kind served: ``"embedding"``."""
        return "embedding"

    @classmethod
    def is_available(cls) -> bool:
        """Whether sentence-transformers and torch are installed (nothing is imported)."""
        return all(
            importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "torch")
        )

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_ready(self) -> bool:
        """True between a successful :meth:`setup` and :meth:`teardown`."""
        return self._model is not None

    @property
    def device(self) -> str | None:
        """The device the model was loaded on (None before setup)."""
        return self._device

    @property
    def dimension(self) -> int:
        """Embedding size of the loaded model.

        Raises:
            RuntimeError: :meth:`setup` has not run.
        """
        if self._dimension is None:
            raise RuntimeError("EmbeddingEngine.dimension is known after setup()")
        return self._dimension

    def _resolve_device(self) -> str:
        dev = self.config.device
        if dev == "auto":
            reason = _cuda_usable("cuda")
            if reason is None:
                return "cuda"
            logger.info("EmbeddingEngine: device auto -> cpu (%s)", reason)
            return "cpu"
        if dev.startswith("cuda"):
            reason = _cuda_usable(dev)
            if reason is not None:
                raise BackendNotAvailableError(
                    f"EmbeddingEngineConfig.device={dev!r} cannot be used: {reason}"
                )
        return dev

    def setup(self) -> None:
        """Load the model (idempotent: a second call does nothing).

        Raises:
            DependencyMissingError: sentence-transformers (or torch) is not installed.
            BackendNotAvailableError: a cuda device was asked for and cannot be used.
            OSError / ValueError: the model cannot be loaded (sentence-transformers' error).
        """
        if self._model is not None:
            logger.warning("EmbeddingEngine already set up; setup() skipped")
            return
        try:
            st = importlib.import_module("sentence_transformers")
        except ImportError as exc:
            raise DependencyMissingError(
                f"EmbeddingEngine needs sentence-transformers: {_PIP_HINT} ({exc})"
            ) from exc
        device = self._resolve_device()
        logger.info("Loading embedding model %s on %s", self.config.model_id, device)
        model = st.SentenceTransformer(
            self.config.model_id,
            device=device,
            trust_remote_code=self.config.trust_remote_code,
        )
        limit = getattr(model, "max_seq_length", None)
        model.max_seq_length = (
            min(self.config.max_length, limit) if isinstance(limit, int) else self.config.max_length
        )
        getter = getattr(model, "get_embedding_dimension", None) or getattr(
            model, "get_sentence_embedding_dimension", None
        )
        dim = getter() if callable(getter) else None
        if not isinstance(dim, int) or dim <= 0:
            # Some models do not declare it: measure it.
            dim = len(model.encode(["dimension probe"], convert_to_numpy=True)[0])
        self._model = model
        self._device = device
        self._dimension = int(dim)

    def teardown(self) -> None:
        """Release the model (idempotent); :meth:`setup` may be called again."""
        self._model = None
        self._device = None
        self._dimension = None

    # ------------------------------------------------------------------ encoding
    @overload
    def encode(self, texts: str) -> list[float]: ...

    @overload
    def encode(self, texts: list[str]) -> list[list[float]]: ...

    def encode(self, texts: str | list[str]) -> list[float] | list[list[float]]:
        """Embed one text (one vector) or a list of texts (a vector each, same order).

        Raises:
            RuntimeError: :meth:`setup` has not run.
            ConfigError: ``texts`` is not a str or a list of str.
        """
        if isinstance(texts, str):
            return self._encode([texts], show_progress=False)[0]
        return self._encode(self._check_texts(texts), show_progress=False)

    def encode_batch(self, texts: list[str], show_progress: bool = False) -> list[list[float]]:
        """Embed a list of texts in batches of ``config.batch_size``.

        Raises:
            RuntimeError: :meth:`setup` has not run.
            ConfigError: ``texts`` is not a list of str.
        """
        return self._encode(self._check_texts(texts), show_progress=show_progress)

    @staticmethod
    def _check_texts(texts: Any) -> list[str]:
        if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
            raise ConfigError(
                f"texts must be a str or a list of str, got {type(texts).__name__}"
                + (
                    f" containing {type(next(t for t in texts if not isinstance(t, str))).__name__}"
                    if isinstance(texts, list | tuple)
                    else ""
                )
            )
        return list(texts)

    def _encode(self, texts: list[str], *, show_progress: bool) -> list[list[float]]:
        model = self._model
        if model is None:
            raise RuntimeError("EmbeddingEngine is not set up; call setup() first")
        if not texts:
            return []
        vectors = model.encode(
            texts,
            batch_size=self.config.batch_size,
            show_progress_bar=show_progress,
            normalize_embeddings=self.config.normalize,
            convert_to_numpy=True,
        )
        out: list[list[float]] = vectors.tolist()
        if out and not all(math.isfinite(x) for x in out[0]):
            raise RuntimeError(f"model {self.config.model_id!r} produced non-finite embeddings")
        return out
