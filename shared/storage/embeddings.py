"""The embedding hook: plug a vector model into knowledge search without steprun shipping one.

Set ``STEPRUN_EMBEDDER=package.module:attr`` where ``attr`` is a class (or
factory) called with no arguments that returns an :class:`Embedder`. When set,
every chunk is embedded at upload and search fuses the full-text ranking with
a cosine ranking (reciprocal rank fusion). Unset (the default), search is
full-text only and nothing is downloaded or called.

:class:`HashingEmbedder` is a dependency-free example (feature hashing of
words): it shows the shape, and it is what the tests use.
"""
from __future__ import annotations

import hashlib
import importlib
import math
import re
from functools import lru_cache
from typing import Protocol


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, all of the same length."""
        ...


@lru_cache(maxsize=4)
def load_embedder(spec: str | None) -> Embedder | None:
    """The embedder named by ``module:attr`` (built once per process), or None."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"STEPRUN_EMBEDDER={spec!r}: expected 'module:attr'")
    factory = getattr(importlib.import_module(module_name), attr)
    embedder = factory()
    if not callable(getattr(embedder, "embed", None)):
        raise ValueError(f"STEPRUN_EMBEDDER={spec!r} built {type(embedder).__name__}, which has no embed()")
    return embedder


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


class HashingEmbedder:
    """Words hashed into ``dims`` buckets, L2-normalised. Lexical, not semantic: an example, not a model."""

    def __init__(self, dims: int = 256):
        self.dims = dims

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors = []
        for text in texts:
            vector = [0.0] * self.dims
            for word in re.findall(r"\w+", text.lower()):
                bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big")
                vector[bucket % self.dims] += 1.0
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vectors.append([round(v / norm, 6) for v in vector])
        return vectors
