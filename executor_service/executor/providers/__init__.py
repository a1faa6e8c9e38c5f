"""Model providers: ``llama_cpp`` (local GGUF), ``openai`` (compatible endpoints), ``simulated``."""

from __future__ import annotations

from typing import Any

from .base import (
    Call,
    Chunk,
    Completion,
    Provider,
    ProviderCancelled,
    ProviderFailure,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
)

__all__ = [
    "Call",
    "Chunk",
    "Completion",
    "Provider",
    "ProviderCancelled",
    "ProviderFailure",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderTimeout",
    "create_provider",
    "provider_kinds",
]


def provider_kinds() -> tuple[str, ...]:
    return ("llama_cpp", "openai", "simulated")


def create_provider(kind: str, model: str, options: dict[str, Any]) -> Provider:
    """Build the provider named in the catalog; imports are lazy so llama-cpp stays optional."""
    if kind == "simulated":
        from .simulated import SimulatedProvider

        return SimulatedProvider(model, options)
    if kind == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(model, options)
    if kind == "llama_cpp":
        from .llama_cpp import LlamaCppProvider

        return LlamaCppProvider(model, options)
    raise ValueError(f"unknown provider {kind!r}; expected one of {', '.join(provider_kinds())}")
