"""The client rule of DESIGN section 5, as code: what a client shows for a turn, folded from its events.

The log keeps two promises that make the rule safe whatever order events arrive in:

- every event of a step (``message.delta``, ``tool.call``, ``tool.result``, ``step.*``) carries
  ``data.step`` and ``data.attempt``; once an attempt of a step has written to the log, no earlier
  attempt of that turn writes again, and nothing of the turn's steps follows its terminal event
  (appends are fenced);
- ``step.completed`` carries the step's committed ``text``; it, the tool events, ``turn.requires_action``
  and the terminal event are kept in Postgres and republished if the log lost them, each at most once
  per log.

The rule: per step, keep only the highest ``attempt`` seen (a higher one drops what the step showed
before); a step's text is its deltas until ``step.completed``, then that event's ``text``, and nothing
of the step after it changes it; tool calls and results are keyed by their ``id``; the turn's text is
its steps' texts in step order; the turn is over at its terminal event. The protocol adapters (OpenAI,
LangGraph) and the soak (bench) use this class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_TYPES = frozenset({"turn.completed", "turn.failed", "turn.cancelled", "turn.expired", "turn.incomplete"})


@dataclass
class StepView:
    attempt: int = 0
    text: str = ""
    committed: bool = False
    tool_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    tool_results: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TurnView:
    """One turn as a client following the rule shows it."""

    turn_id: str
    steps: dict[int, StepView] = field(default_factory=dict)
    terminal: dict[str, Any] | None = None
    requires_action: dict[str, Any] | None = None
    # Step events dropped because an attempt newer than theirs had already written (should stay 0).
    stale: int = 0

    @property
    def text(self) -> str:
        return "".join(self.steps[s].text for s in sorted(self.steps))

    @property
    def done(self) -> bool:
        return self.terminal is not None

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event in (events of other turns are ignored)."""
        if event.get("turn_id") != self.turn_id:
            return
        kind, data = event.get("type"), event.get("data") or {}
        if kind in TERMINAL_TYPES:
            self.terminal = event
            return
        if kind == "turn.requires_action":
            self.requires_action = event
        step, attempt = data.get("step"), data.get("attempt")
        if not isinstance(step, int) or not isinstance(attempt, int):
            return
        view = self.steps.setdefault(step, StepView(attempt=attempt))
        if view.committed:
            return  # the committed text is final
        if attempt < view.attempt:
            self.stale += 1
            return
        if attempt > view.attempt:
            self.steps[step] = view = StepView(attempt=attempt)  # a newer attempt: drop the older one's
        if kind == "message.delta":
            view.text += str(data.get("text") or "")
        elif kind == "tool.call":
            view.tool_calls[str(data.get("id"))] = data
        elif kind == "tool.result":
            view.tool_results[str(data.get("id"))] = data
        elif kind == "step.completed":
            if isinstance(data.get("text"), str):
                view.text = data["text"]
            view.committed = True
