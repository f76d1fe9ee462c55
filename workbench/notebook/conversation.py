"""The chat as data: one conversation per branch, and the turns as shown.

With "compare" on, baseline (no steering) and steered are two separate
conversations: each branch's history holds its own replies, so from the
second turn on the baseline still answers an unsteered conversation. A turn
that was stopped or failed is shown but is part of neither history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.capture import CaptureHandle
from workbench.errors import SessionError
from workbench.specs import SteeringSpec

BASELINE = "baseline"
STEERED = "steered"

RUNNING, DONE, STOPPED, FAILED = "running", "done", "stopped", "failed"
TURN_STATES = (RUNNING, DONE, STOPPED, FAILED)

Message = dict[str, str]


@dataclass
class Turn:
    """One user message and each branch's reply (partial while it runs)."""

    user: str
    replies: dict[str, str] = field(default_factory=dict)
    """Branch label -> reply text (the prefill included)."""
    state: str = DONE
    """One of ``TURN_STATES``."""


@dataclass
class Conversation:
    """Each branch's history and the turns shown; ``compare`` is fixed until ``reset``."""

    compare: bool = True
    histories: dict[str, list[Message]] = field(default_factory=lambda: {BASELINE: [], STEERED: []})
    turns: list[Turn] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """The branches that run, baseline first."""
        return [BASELINE, STEERED] if self.compare else [STEERED]

    @property
    def is_empty(self) -> bool:
        return not self.turns

    def reset(self, compare: bool) -> None:
        self.compare = compare
        self.histories = {BASELINE: [], STEERED: []}
        self.turns = []

    def prompts(self, system: str, user: str, prefill: str = "") -> list[list[Message]]:
        """The messages each branch sends for this turn, in ``labels`` order."""
        head = [{"role": "system", "content": system}] if system.strip() else []
        tail = [{"role": "assistant", "content": prefill}] if prefill else []
        return [[*head, *self.histories[label], {"role": "user", "content": user}, *tail] for label in self.labels]

    def start(self, user: str, prefill: str = "") -> Turn:
        turn = Turn(user, {label: prefill for label in self.labels}, RUNNING)
        self.turns.append(turn)
        return turn

    def finish(self, turn: Turn, replies: dict[str, Message]) -> None:
        """Record ``replies`` (label -> assistant message) in each branch's history."""
        for label, message in replies.items():
            self.histories[label] += [{"role": "user", "content": turn.user}, message]
            turn.replies[label] = message["content"]
        turn.state = DONE

    def to_dict(self) -> dict[str, Any]:
        return {
            "compare": self.compare,
            "histories": self.histories,
            "turns": [{"user": t.user, "replies": t.replies, "state": t.state} for t in self.turns],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        try:
            histories = {BASELINE: [], STEERED: [], **{k: list(v) for k, v in data.get("histories", {}).items()}}
            turns = [Turn(t["user"], dict(t["replies"]), t.get("state", DONE)) for t in data.get("turns", [])]
            conversation = cls(bool(data.get("compare", True)), histories, turns)
        except (KeyError, TypeError, AttributeError) as error:
            raise SessionError(f"the saved conversation is malformed: {error!r}") from None
        for turn in conversation.turns:
            if turn.state == RUNNING:  # saved mid-turn: it never finished
                turn.state = STOPPED
        return conversation


@dataclass
class TurnCaptures:
    """What one finished turn captured, for the activation plots."""

    labels: list[str]
    handles: list[CaptureHandle]
    """Every layer of each branch's request, in ``labels`` order."""
    spec: SteeringSpec
    """The steering of the steered branch."""
