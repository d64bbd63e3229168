"""Agents that report what they can see (STEPRUN_AGENTS=tests.support.agents_isolation)."""
from __future__ import annotations

from typing import Any

from shared.agent import Agent, ToolContext, tool
from shared.llm.scripted import Reply, ScriptedModel


@tool
def whoami(ctx: ToolContext) -> str:
    """Say whose call this is."""
    return f"{ctx.tenant_id}/{ctx.user_id}/{ctx.session_id}"


def _recite(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Reply:
    """Answer with every user message the model was shown, after asking whoami once per turn."""
    if messages[-1]["role"] == "user" and "whoami" in messages[-1]["content"]:
        from shared.llm.base import ToolCallRequest

        return Reply(tool_calls=[ToolCallRequest(id=f"c{len(messages)}", name="whoami", arguments={})])
    seen = [m["content"] for m in messages if m["role"] == "user"]
    tool_said = [m["content"] for m in messages if m["role"] == "tool"]
    return Reply(text="users: " + " | ".join(seen) + " ; tools: " + " | ".join(tool_said))


AGENTS = [Agent(name="recite", model=ScriptedModel(tps=400, script=_recite), tools=[whoami])]
