"""The agent authoring surface: ``Agent`` and ``@tool``.

```python
from shared.agent import Agent, tool

@tool
def add(a: int, b: int) -> int:
    \"\"\"Add two integers.\"\"\"
    return a + b

AGENTS = [Agent(name="math", instructions="You add numbers.", model="scripted", tools=[add])]
```

A tool's JSON schema is derived from its signature and docstring. A parameter
annotated :class:`ToolContext` receives the call's context and is left out of
the schema.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class AgentDefinitionError(ValueError):
    """An agent or tool definition is unusable; raised when the agents are loaded."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the call it serves. Scoped to one principal."""

    tenant_id: str
    user_id: str
    session_id: str
    turn_id: str
    # "turn:step:call-id": the same for every execution of this call, in every attempt (a retried
    # step reuses the model's recorded response, so the call id does not change).
    idempotency_key: str
    # The user's long-term memory (shared.storage.memory.MemoryStore) and the knowledge they may
    # search (shared.storage.knowledge.KnowledgeBase), both bound to this principal. None where a
    # context is built without a runtime (a tool called directly in a test).
    memory: Any = None
    knowledge: Any = None


@dataclass(frozen=True)
class Tool:
    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]
    requires_approval: bool = False
    context_param: str | None = None
    # The call is answered by the user, not run: the turn pauses (see ``ask_user``).
    asks_user: bool = False
    # Safe to run again when a worker died while it ran (its outcome unknown): it dedupes its
    # effect on ``ToolContext.idempotency_key``. Otherwise such a call pauses (or fails) the turn.
    idempotent: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def schema(self) -> dict[str, Any]:
        """The OpenAI tool definition."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        """Call the tool with model-supplied arguments; unknown arguments are a TypeError.

        An ``async def`` tool is awaited to its end on an event loop of its own (a native thread
        under the gevent worker), so the model receives its result, never a coroutine object.
        """
        kwargs = dict(arguments)
        if self.context_param:
            kwargs[self.context_param] = context
        if self.is_async:
            return _run_coroutine(self.fn, kwargs)
        value = self.fn(**kwargs)
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()
            raise TypeError(f"tool {self.name!r} returned an awaitable; declare it `async def` so it is awaited")
        return value


def _run_coroutine(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Run ``await fn(**kwargs)`` to completion from synchronous step code."""
    try:
        from gevent import get_hub, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        monkey = None
    if monkey is not None and monkey.is_module_patched("threading"):
        # Greenlets share one OS thread, and asyncio allows one running loop per thread: run the
        # coroutine on a native thread of gevent's pool, which this greenlet waits for cooperatively.
        return get_hub().threadpool.apply(asyncio.run, (fn(**kwargs),))
    return asyncio.run(fn(**kwargs))


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    requires_approval: bool = False,
    idempotent: bool = False,
) -> Any:
    """Turn a typed function into a tool. Usable bare (``@tool``) or with options.

    ``idempotent=True`` declares that running the call twice with the same
    ``ctx.idempotency_key`` has the effect of running it once: steprun then re-runs a
    call whose worker died mid-way instead of asking the user what happened.
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        tool_name = name or f.__name__
        if not NAME_RE.match(tool_name):
            raise AgentDefinitionError(f"tool name {tool_name!r} must match {NAME_RE.pattern}")
        summary, param_docs = _parse_docstring(inspect.getdoc(f) or "")
        parameters, context_param = _parameters_schema(f, param_docs)
        return Tool(
            fn=f,
            name=tool_name,
            description=description or summary or tool_name,
            parameters=parameters,
            requires_approval=requires_approval,
            context_param=context_param,
            idempotent=idempotent,
        )

    return wrap(fn) if fn is not None else wrap


@dataclass(frozen=True)
class Agent:
    """A registered agent definition. Immutable: a fresh model is built for every step."""

    name: str
    instructions: str = ""
    model: Any = "scripted"
    tools: list[Tool] = field(default_factory=list)
    max_steps: int = 8
    description: str = ""
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise AgentDefinitionError(f"agent name {self.name!r} must match {NAME_RE.pattern}")
        tools = [t if isinstance(t, Tool) else tool(t) for t in self.tools]
        object.__setattr__(self, "tools", tools)
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise AgentDefinitionError(f"agent {self.name!r} has two tools with one name: {names}")
        if self.max_steps < 1:
            raise AgentDefinitionError(f"agent {self.name!r}: max_steps must be at least 1")

    def tool_named(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description or self.instructions[:200],
            "model": self.model if isinstance(self.model, str) else getattr(self.model, "name", "custom"),
            "max_steps": self.max_steps,
            "tools": [
                {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    "requires_approval": t.requires_approval,
                    "idempotent": t.idempotent,
                }
                for t in self.tools
            ],
        }


class AgentRegistry:
    """The agents one deployment serves, by name."""

    def __init__(self, agents: list[Agent]):
        self._agents: dict[str, Agent] = {}
        for agent in agents:
            if not isinstance(agent, Agent):
                raise AgentDefinitionError(f"AGENTS must hold Agent objects, got {type(agent).__name__}")
            if agent.name in self._agents:
                raise AgentDefinitionError(f"two agents are named {agent.name!r}")
            check_agent(agent)
            self._agents[agent.name] = agent

    @classmethod
    def from_module(cls, module_name: str | None) -> AgentRegistry:
        """Load ``AGENTS`` from the named module, or the built-in demo agents; check each agent's model
        and tools, so a bad definition fails at start (one line naming it) rather than at a turn."""
        name = module_name or "shared.demo_agents"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and (name == missing or name.startswith(missing + ".")):
                path = ", ".join(p or "." for p in sys.path)
                raise AgentDefinitionError(
                    f"STEPRUN_AGENTS={name}: no module named {missing!r} (searched: {path})") from None
            raise
        agents = getattr(module, "AGENTS", None)
        if not isinstance(agents, (list, tuple)):
            raise AgentDefinitionError(f"module {module.__name__!r} has no AGENTS list")
        return cls(list(agents))

    def get(self, name: str) -> Agent | None:
        return self._agents.get(name)

    def __iter__(self) -> typing.Iterator[Agent]:
        return iter(self._agents.values())


def check_agent(agent: Agent) -> None:
    """Raise AgentDefinitionError unless the agent's model name is known and every tool schema is usable."""
    from shared.llm import ModelError, check_model_spec

    try:
        check_model_spec(agent.model)
    except ModelError as exc:
        raise AgentDefinitionError(f"agent {agent.name!r}: {exc}") from None
    for t in agent.tools:
        check_tool_schema(t, agent.name)


def check_tool_schema(t: Tool, agent: str = "?") -> None:
    """A tool's parameters must be a JSON object schema a provider accepts."""
    where = f"agent {agent!r}, tool {t.name!r}"
    if not NAME_RE.match(t.name):
        raise AgentDefinitionError(f"{where}: the name must match {NAME_RE.pattern}")
    if not isinstance(t.description, str):
        raise AgentDefinitionError(f"{where}: the description must be a string")
    params = t.parameters
    if not isinstance(params, dict) or params.get("type") != "object":
        raise AgentDefinitionError(f"{where}: parameters must be a JSON schema with \"type\": \"object\"")
    props = params.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
        raise AgentDefinitionError(f"{where}: parameters.properties must map each name to a schema object")
    required = params.get("required", [])
    if not isinstance(required, list) or any(r not in props for r in required):
        raise AgentDefinitionError(f"{where}: parameters.required must list names of parameters.properties")
    try:
        json.dumps(params)
    except (TypeError, ValueError) as exc:
        raise AgentDefinitionError(f"{where}: parameters are not JSON ({exc})") from None


_PRIMITIVES: dict[Any, str] = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _json_schema(annotation: Any) -> dict[str, Any]:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    if annotation in _PRIMITIVES:
        return {"type": _PRIMITIVES[annotation]}
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _json_schema(options[0])
        return {"anyOf": [_json_schema(a) for a in options]}
    if annotation in (list, tuple) or origin in (list, tuple, typing.Sequence):
        return {"type": "array", "items": _json_schema(args[0]) if args else {}}
    if annotation is dict or origin is dict:
        return {"type": "object"}
    raise AgentDefinitionError(f"tool parameter type {annotation!r} has no JSON schema")


def _parameters_schema(fn: Callable[..., Any], docs: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    context_param = None
    for pname, param in inspect.signature(fn).parameters.items():
        annotation = hints.get(pname, param.annotation)
        if annotation is ToolContext or ToolContext in get_args(annotation):
            context_param = pname
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise AgentDefinitionError(f"tool {fn.__name__}: *args/**kwargs cannot be described to a model")
        schema = _json_schema(annotation)
        if pname in docs:
            schema["description"] = docs[pname]
        if param.default is inspect.Parameter.empty:
            required.append(pname)
        elif param.default is None or isinstance(param.default, (int, float, str, bool)):
            schema["default"] = param.default
        properties[pname] = schema
    return {"type": "object", "properties": properties, "required": required}, context_param


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """First paragraph as the summary; ``Args:`` entries (Google style) as parameter docs."""
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    match = re.search(r"^(?:Args|Arguments|Parameters):\s*\n(.*?)(?:\n\s*\n|\Z)", doc, re.S | re.M)
    if match:
        for line in match.group(1).splitlines():
            m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)", line)
            if m:
                params[m.group(1)] = m.group(2).strip()
    return summary, params


def _ask_user(question: str) -> str:
    """Ask the user a question and wait for the answer. Use it when you cannot go on without them.

    Args:
        question: what to ask, in a sentence or two
    """
    raise RuntimeError("ask_user is answered by the user through resume, never run")


# Built in: put ``ask_user`` in an agent's tools and a call to it pauses the turn in
# requires_action (pending.reason "question"); POST /v1/turns/{id}/resume {"input": ...}
# gives the model the answer as the call's result.
ask_user: Tool = dataclasses.replace(tool(_ask_user, name="ask_user"), asks_user=True)


__all__ = ["Agent", "AgentDefinitionError", "AgentRegistry", "Tool", "ToolContext", "ask_user", "tool"]
