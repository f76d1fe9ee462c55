"""The chat panel: replies stream in token by token, side by side when
"compare" runs the baseline branch next to the steered one, and Stop aborts
the running requests (the engine keeps serving).

A turn runs on the engine's loop thread; the panel shows the user's message
at once, disables Send until the turn ends, and re-renders a branch's column
at most every ``RENDER_INTERVAL_S`` while text arrives.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from workbench.notebook.conversation import (
    BASELINE,
    FAILED,
    RUNNING,
    STEERED,
    STOPPED,
    Conversation,
    Turn,
    TurnCaptures,
)
from workbench.notebook.engine import NotebookEngine
from workbench.notebook.widgets import StatusLine
from workbench.specs import SteeringSpec

RENDER_INTERVAL_S = 0.1

_NOTES = {
    RUNNING: "",
    STOPPED: "stopped; not part of the conversation",
    FAILED: "failed; not part of the conversation",
}


def render_branch(conversation: Conversation, label: str) -> str:
    """One branch's column of the transcript as HTML."""
    parts = [f"<div class='wb-branch-title'><b>{html.escape(label)}</b></div>"]
    for turn in conversation.turns:
        if label not in turn.replies:
            continue
        faded = " style='color:#777'" if turn.state in (STOPPED, FAILED) else ""
        parts.append(f"<p{faded}><b>you:</b> {html.escape(turn.user)}</p>")
        reply = html.escape(turn.replies[label]) or ("<i>...</i>" if turn.state == RUNNING else "<i>(empty)</i>")
        note = f" <i>({_NOTES[turn.state]})</i>" if _NOTES.get(turn.state) else ""
        parts.append(f"<p{faded}><b>{html.escape(label)}:</b> {reply}{note}</p>")
    return "".join(parts)


class ChatPanel:
    """Chat with the steered model; "compare" also runs the unsteered branch."""

    def __init__(self, engine: NotebookEngine) -> None:
        self.engine = engine
        self.conversation = Conversation()
        self.on_turn: list[Callable[[TurnCaptures], None]] = []
        """Called with each finished turn's captures (in the loop thread)."""
        self.on_reset: list[Callable[[], None]] = []
        """Called after New chat."""
        self.system = w.Textarea(value="You are a helpful assistant.", description="system", layout={"width": "98%"})
        self.columns = {label: w.HTML(layout={"min_width": "0"}) for label in (BASELINE, STEERED)}
        for label, column in self.columns.items():
            column.add_class(f"wb-column-{label}")
        self.transcript = w.GridBox(
            list(self.columns.values()),
            layout={"grid_template_columns": "repeat(2, minmax(0, 1fr))", "grid_gap": "12px", "width": "100%"},
        )
        self.prefill = w.Text(
            placeholder="assistant prefill (optional)", description="prefill", layout={"width": "98%"}
        )
        self.input = w.Text(
            placeholder="Say something",
            description="you",
            layout={"flex": "1 1 auto", "width": "auto", "min_width": "0"},
        )
        fixed = {"width": "auto", "flex": "0 0 auto"}  # buttons keep their labels; the input gives way
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane", layout=fixed)
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True, button_style="danger", layout=fixed)
        reset = w.Button(description="New chat", icon="refresh", layout=fixed)
        self.compare = w.Checkbox(value=True, description="compare with baseline", indent=False)
        self.temperature = w.FloatSlider(
            value=0.0, min=0.0, max=1.5, step=0.05, description="temperature", continuous_update=False
        )
        self.max_tokens = w.IntSlider(value=48, min=1, max=512, description="max tokens", continuous_update=False)
        for slider in (self.temperature, self.max_tokens):
            slider.style.description_width = "initial"
            # Wider than two fit beside each other in a narrow column: each then takes a line of its own.
            slider.layout = {"width": "auto", "flex": "1 1 280px"}
        self.status = StatusLine()
        self.last_future: Any = None
        self._running: Turn | None = None
        """The turn in progress; Send is refused until its last callback has run."""
        self.send_button.on_click(lambda _: self.send())
        self.input.on_submit(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        reset.on_click(lambda _: self.reset())
        self.compare.observe(lambda _: self._compare_changed(), names="value")
        self.widget = w.VBox(
            [
                w.HTML("<b>Chat</b>"),
                self.system,
                self.transcript,
                w.HBox([self.input, self.send_button, self.stop_button, reset], layout={"width": "100%"}),
                self.prefill,
                w.HBox([self.compare, self.temperature, self.max_tokens], layout={"flex_flow": "row wrap"}),
                self.status.widget,
            ],
            layout={"width": "100%"},
        )
        self.widget.add_class("wb-chat")
        self._render()

    # -- state -------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._running is not None

    def history(self, label: str = STEERED) -> list[dict[str, str]]:
        """A branch's conversation so far (the system prompt not included)."""
        return list(self.conversation.histories[label])

    def reset(self) -> None:
        """New chat: both branches start empty; "compare" can be changed again."""
        if self.busy:
            self.stop()
        self.conversation.reset(self.compare.value)
        self.compare.disabled = False
        self._render()
        self.status.show("")
        for listener in self.on_reset:
            listener()

    def _compare_changed(self) -> None:
        if self.conversation.is_empty:
            self.conversation.compare = self.compare.value
            self._render()

    def settings(self) -> dict[str, Any]:
        """The controls' values and the conversation, as JSON-able data."""
        return {
            "system": self.system.value,
            "prefill": self.prefill.value,
            "temperature": self.temperature.value,
            "max_tokens": self.max_tokens.value,
            "conversation": self.conversation.to_dict(),
        }

    def restore(self, settings: dict[str, Any]) -> None:
        """Put back a saved conversation and the controls' values."""
        for name in ("system", "prefill", "temperature", "max_tokens"):
            if name in settings:
                getattr(self, name).value = settings[name]
        self.conversation = Conversation.from_dict(settings.get("conversation", {}))
        self.compare.value = self.conversation.compare
        self.compare.disabled = not self.conversation.is_empty
        self._render()

    def _render(self, only: str | None = None) -> None:
        labels = self.conversation.labels
        self.columns[BASELINE].layout.display = "" if BASELINE in labels else "none"
        self.transcript.layout.grid_template_columns = f"repeat({len(labels)}, minmax(0, 1fr))"
        for label in labels if only is None else [only]:
            self.columns[label].value = render_branch(self.conversation, label)

    # -- a turn ------------------------------------------------------------

    def send(self) -> Any:
        """Send the input box's text; returns the bridge future (``None`` when
        there is nothing to send or a turn is running)."""
        text = self.input.value.strip()
        if not text or self.busy:
            return None
        from vllm import SamplingParams

        model = self.engine.model
        conversation = self.conversation
        prompts = conversation.prompts(self.system.value, text, self.prefill.value)
        options = {"add_generation_prompt": False, "continue_final_message": True} if self.prefill.value else None
        steered = model.export_steering_spec()
        specs = [SteeringSpec() if label == BASELINE else steered for label in conversation.labels]
        params = SamplingParams(temperature=self.temperature.value, max_tokens=self.max_tokens.value)
        labels, prefill = conversation.labels, self.prefill.value
        turn = conversation.start(text, prefill)
        self.input.value = ""
        self.compare.disabled = True
        self._set_running(turn)
        self._render()
        self.status.show("generating...")
        last_render = {label: 0.0 for label in labels}

        def on_text(index: int, generated: str) -> None:
            label = labels[index]
            turn.replies[label] = prefill + generated
            now = time.monotonic()
            if now - last_render[label] >= RENDER_INTERVAL_S:
                last_render[label] = now
                self._render(label)

        async def run_turn() -> tuple[list[Any], list[Any]]:
            responses, handles = await model.chat(
                prompts,
                sampling_params=params,
                chat_options=options,
                capture_layers=list(range(model.layer_count)),
                steering_spec=specs,
                on_text=on_text,
            )
            await model.fetch_captures_batch(handles)
            return responses, handles

        def done(result: Any, error: BaseException | None) -> None:
            try:
                if isinstance(error, asyncio.CancelledError):
                    turn.state = STOPPED
                    self.status.show("stopped; the engine is ready for the next message")
                elif error is not None:
                    turn.state = FAILED
                    self.status.report(error)
                else:
                    responses, handles = result
                    conversation.finish(turn, {label: r.to_message() for label, r in zip(labels, responses)})
                    self.status.show(_broken_note(labels, responses))
                    captures = TurnCaptures(labels, handles, steered)
                    for listener in self.on_turn:
                        listener(captures)
                self._render()
            finally:
                self._set_running(None)

        self.last_future = self.engine.submit(run_turn(), done)
        return self.last_future

    def stop(self) -> None:
        """Abort the running turn (its requests are cancelled in the engine)."""
        if self.last_future is not None:
            self.last_future.cancel()

    def _set_running(self, turn: Turn | None) -> None:
        self._running = turn
        self.send_button.disabled = turn is not None
        self.stop_button.disabled = turn is None


def _broken_note(labels: list[str], responses: list[Any]) -> str:
    broken = [
        f"steering broke the {label} reply's residual stream at layer {r.nonfinite_layer} (its text is not the model's)"
        for label, r in zip(labels, responses)
        if getattr(r, "nonfinite_layer", None) is not None
    ]
    return "; ".join(broken)
