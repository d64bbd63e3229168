"""Models behind one streaming interface, named by a string."""
from typing import Any

from shared.llm.base import (  # noqa: F401  (re-exported)
    ChatMessage,
    Model,
    ModelError,
    ModelResponse,
    OnDelta,
    ToolCallRequest,
    TransientModelError,
    Usage,
)


def build_model(spec: Any, settings: Any) -> Model:
    """A fresh model for one step, from an agent's ``model`` (a name or a Model object)."""
    if not isinstance(spec, str):
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "scripted":
        from shared.llm.scripted import ScriptedModel

        return ScriptedModel.from_spec(rest)
    if kind == "openai":
        from shared.llm.openai import OpenAIModel

        if not rest:
            raise ModelError("model 'openai:' needs a model name, e.g. openai:gpt-4o-mini")
        return OpenAIModel(rest, base_url=settings.openai_base_url, api_key=settings.openai_api_key)
    raise ModelError(f"unknown model {spec!r} (known: scripted[:options], openai:<model>)")
