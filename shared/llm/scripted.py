"""The ``scripted`` model: deterministic, offline, streaming at a set rate.

It powers the demo agents, the tests and the benchmarks. Its default script:

- after a tool result, it answers with the result ("The result of add is 5.");
- if the user's input names one of the agent's tools, it calls that tool, filling
  number parameters with the numbers in the input (in order) and string
  parameters with the text after the tool's name;
- otherwise it echoes the input, followed by ``words`` filler words.

Options ride on the name: ``scripted:ttft=0.05,tps=200,words=100``.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.llm.base import ChatMessage, ModelResponse, OnDelta, ToolCallRequest, Usage
from shared.llm.interrupt import interruptible_sleep

FILLER = (
    "steady tokens flow from the scripted model so every client sees a long answer arrive piece by piece "
    "while the runtime checkpoints each step and keeps the stream resumable"
).split()


@dataclass
class Reply:
    text: str = ""
    tool_calls: list[ToolCallRequest] | None = None


Script = Callable[[list[ChatMessage], list[dict[str, Any]]], Reply]


class ScriptedModel:
    def __init__(
        self,
        *,
        ttft: float = 0.0,
        tps: float = 0.0,
        words: int = 0,
        script: Script | None = None,
    ):
        self.ttft = ttft
        self.tps = tps  # tokens per second; 0 streams as fast as possible
        self.words = words
        self.script = script or self.default_script
        self.name = "scripted"

    @classmethod
    def from_spec(cls, options: str) -> ScriptedModel:
        """Build from the part after ``scripted:``, e.g. ``ttft=0.05,tps=200``."""
        kwargs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in options.split(","))):
            key, _, value = part.partition("=")
            if key not in {"ttft", "tps", "words"}:
                raise ValueError(f"scripted model: unknown option {key!r} (known: ttft, tps, words)")
            kwargs[key] = int(value) if key == "words" else float(value)
        return cls(**kwargs)

    def generate(
        self,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]],
        on_delta: OnDelta,
        *,
        max_output_tokens: int | None = None,
    ) -> ModelResponse:
        started = time.monotonic()
        reply = self.script(messages, tools)
        if self.ttft:
            interruptible_sleep(self.ttft)
        tokens = re.findall(r"\s*\S+", reply.text)
        finish = "tool_calls" if reply.tool_calls else "stop"
        if max_output_tokens is not None and len(tokens) > max_output_tokens:
            tokens, finish = tokens[:max_output_tokens], "length"
        interval = 1.0 / self.tps if self.tps else 0.0
        first_token_at = None
        next_at = time.monotonic()
        for token in tokens:
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    interruptible_sleep(delay)
            if first_token_at is None:
                first_token_at = time.monotonic()
            on_delta(token)
        prompt_words = sum(len(str(m.get("content") or "").split()) for m in messages)
        return ModelResponse(
            text="".join(tokens),
            tool_calls=list(reply.tool_calls or []) if finish != "length" else [],
            usage=Usage(input_tokens=prompt_words, output_tokens=len(tokens)),
            finish_reason=finish,
            time_to_first_token=(first_token_at - started) if first_token_at else None,
        )

    def default_script(self, messages: list[ChatMessage], tools: list[dict[str, Any]]) -> Reply:
        last = messages[-1] if messages else {"role": "user", "content": ""}
        if last.get("role") == "tool":
            results = []
            for m in reversed(messages):
                if m.get("role") != "tool":
                    break
                results.append(f"The result of {m.get('name') or 'the tool'} is {m.get('content')}.")
            return Reply(text=" ".join(reversed(results)))
        text = str(last.get("content") or "")
        call = _tool_call_for(text, tools, turn_index=len(messages))
        if call is not None:
            return Reply(tool_calls=[call])
        filler = " ".join(FILLER[i % len(FILLER)] for i in range(self.words))
        return Reply(text=f"You said: {text}" + (f" {filler}" if filler else ""))


def _tool_call_for(text: str, tools: list[dict[str, Any]], turn_index: int) -> ToolCallRequest | None:
    lowered = text.lower()
    for spec in tools:
        fn = spec["function"]
        match = re.search(rf"\b{re.escape(fn['name'].lower())}\b", lowered)
        if not match:
            continue
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text)]
        rest = text[match.end():].strip(" :,.")
        arguments: dict[str, Any] = {}
        for pname, pschema in fn["parameters"].get("properties", {}).items():
            kind = pschema.get("type")
            if kind in ("integer", "number") and numbers:
                value = numbers.pop(0)
                arguments[pname] = int(value) if kind == "integer" else value
            elif kind == "string":
                arguments[pname] = rest
        call_id = f"call_{turn_index}_{fn['name']}"
        return ToolCallRequest(id=call_id, name=fn["name"], arguments=json.loads(json.dumps(arguments)))
    return None
