"""The authoring surface: tool schemas from signatures, registry checks, the scripted model."""
from __future__ import annotations

from typing import Literal

import pytest

from shared.agent import Agent, AgentDefinitionError, AgentRegistry, ToolContext, tool
from shared.llm import ModelError, build_model
from shared.llm.scripted import ScriptedModel
from shared.settings import Settings


def test_schema_comes_from_signature_and_docstring() -> None:
    @tool
    def book(city: str, nights: int, budget: float = 100.0, tags: list[str] | None = None,
             kind: Literal["hotel", "hostel"] = "hotel", ctx: ToolContext | None = None) -> str:
        """Book a room.

        Args:
            city: where to stay
            nights: how many nights
        """
        return city

    schema = book.schema()["function"]
    assert schema["name"] == "book" and schema["description"] == "Book a room."
    props = schema["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "where to stay"}
    assert props["nights"]["type"] == "integer" and props["budget"] == {"type": "number", "default": 100.0}
    assert props["tags"]["type"] == "array" and props["tags"]["items"] == {"type": "string"}
    assert props["kind"]["enum"] == ["hotel", "hostel"]
    assert schema["parameters"]["required"] == ["city", "nights"]
    assert "ctx" not in props  # the context is injected, never described to the model


def test_context_is_injected() -> None:
    @tool
    def whoami(ctx: ToolContext) -> str:
        """Who is asking."""
        return f"{ctx.user_id}@{ctx.tenant_id}:{ctx.idempotency_key}"

    assert whoami.context_param == "ctx"
    out = whoami.invoke({}, ToolContext(tenant_id="t", user_id="u", session_id="s", turn_id="turn",
                                          idempotency_key="turn:0:c1"))
    assert out == "u@t:turn:0:c1"


def test_bad_definitions_are_refused_at_load() -> None:
    with pytest.raises(AgentDefinitionError):
        Agent(name="has space")
    with pytest.raises(AgentDefinitionError):
        AgentRegistry([Agent(name="a"), Agent(name="a")])

    def varargs(*args: int) -> int:
        return 0

    with pytest.raises(AgentDefinitionError):
        tool(varargs)
    with pytest.raises(AgentDefinitionError):
        AgentRegistry.from_module("tests.conftest")  # no AGENTS list


def test_models_are_named_by_string() -> None:
    settings = Settings()
    model = build_model("scripted:ttft=0.01,tps=500,words=3", settings)
    assert isinstance(model, ScriptedModel) and model.tps == 500 and model.words == 3
    assert build_model("openai:gpt-4o-mini", settings).name == "openai:gpt-4o-mini"
    with pytest.raises(ModelError):
        build_model("nonsense:x", settings)
    with pytest.raises(ValueError):
        build_model("scripted:speed=3", settings)


def test_scripted_model_respects_token_limit_and_streams_everything() -> None:
    model = ScriptedModel(words=20)
    got: list[str] = []
    full = model.generate([{"role": "user", "content": "hi"}], [], got.append)
    assert "".join(got) == full.text and full.finish_reason == "stop" and full.usage.output_tokens == len(got)
    cut = model.generate([{"role": "user", "content": "hi"}], [], lambda _t: None, max_output_tokens=5)
    assert cut.finish_reason == "length" and cut.usage.output_tokens == 5
