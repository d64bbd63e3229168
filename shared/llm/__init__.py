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
        from shared.llm.openai import from_settings

        if not rest:
            raise ModelError("model 'openai:' needs a model name, e.g. openai:gpt-4o-mini")
        return from_settings(rest, settings)
    raise ModelError(f"unknown model {spec!r} (known: scripted[:options], openai:<model>)")


def check_model_spec(spec: Any) -> None:
    """Raise ModelError (naming the problem) unless ``spec`` names a model or is a Model object.

    Called when agents load, so a typo fails at start rather than at the first turn.
    """
    if not isinstance(spec, str):
        if not callable(getattr(spec, "generate", None)):
            raise ModelError(f"model {spec!r} is neither a model name nor an object with generate()")
        return
    kind, _, rest = spec.partition(":")
    if kind == "scripted":
        from shared.llm.scripted import ScriptedModel

        try:
            ScriptedModel.from_spec(rest)
        except ValueError as exc:
            raise ModelError(f"model {spec!r}: {exc}") from None
        return
    if kind == "openai":
        if not rest.strip():
            raise ModelError("model 'openai:' needs a model name, e.g. openai:gpt-4o-mini")
        return
    raise ModelError(f"unknown model {spec!r} (known: scripted[:options], openai:<model>)")
