"""Chat formatting: conversations -> token ids, message boundaries and responses.

``format_conversation`` renders a conversation with the tokenizer's chat
template and tokenizes it once. Message boundaries come from the template's
real output: the text rendered for the first *k* messages is a prefix of the
full prompt, and the character where it ends marks where message *k* starts.

How template tokens are assigned: every token belongs to the message whose
rendered text it starts in. So a message's slice holds its header (e.g.
``<|im_start|>user\\n``), its content and its end-of-turn tokens; text the
template inserts before the first message (a default system prompt, a BOS
token) belongs to the first message; and the generation prompt (e.g.
``<|im_start|>assistant\\n``) belongs to the last message. The boundaries
therefore cover the prompt without gaps or overlaps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workbench import ops
from workbench.capture import MessageBoundary
from workbench.completion import Completion
from workbench.errors import ChatError

ROLES = frozenset(ops.ROLES)

Conversation = Sequence[Mapping[str, Any]]


class ChatResponse(Completion):
    """A chat reply: the generated text (what ``str()`` gives), plus the
    assistant prefill it continues, if any (and ``Completion.nonfinite_layer``)."""

    prefill: str

    def __new__(cls, generated: str, prefill: str = "", nonfinite_layer: int | None = None) -> ChatResponse:
        response = super().__new__(cls, generated, nonfinite_layer)
        response.prefill = prefill
        return response

    @property
    def generated(self) -> str:
        return str.__str__(self)

    @property
    def has_prefill(self) -> bool:
        return bool(self.prefill)

    def full_text(self) -> str:
        """Prefill followed by the generated text: the whole assistant message."""
        return self.prefill + self.generated

    def to_message(self) -> dict[str, str]:
        """The reply as an assistant message, ready to append to the history."""
        return {"role": "assistant", "content": self.full_text()}

    def __repr__(self) -> str:
        flag = "" if self.nonfinite_layer is None else f", nonfinite_layer={self.nonfinite_layer}"
        return f"ChatResponse(generated={self.generated!r}, prefill={self.prefill!r}{flag})"


def split_conversations(messages: Any) -> tuple[list[list[dict[str, Any]]], bool]:
    """``(conversations, was_batch)`` from one conversation or a list of them, validated."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatError("messages must be a non-empty list of message dicts (or a list of such lists)")
    batch = not isinstance(messages[0], Mapping)
    conversations = list(messages) if batch else [messages]
    return [validate_conversation(conversation, i) for i, conversation in enumerate(conversations)], batch


def validate_conversation(conversation: Any, index: int = 0) -> list[dict[str, Any]]:
    where = f"conversation {index}"
    if not isinstance(conversation, Sequence) or isinstance(conversation, str) or not conversation:
        raise ChatError(f"{where} is empty or not a list of messages")
    checked = []
    for position, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ChatError(f"{where}, message {position} is a {type(message).__name__}, not a dict")
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}, message {position} has unknown role {role!r}; known: {sorted(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatError(f"{where}, message {position} ({role}) needs a string 'content'")
        checked.append(dict(message))
    return checked


@dataclass(frozen=True)
class FormattedConversation:
    token_ids: list[int]
    boundaries: tuple[MessageBoundary, ...]
    """Empty unless asked for (``with_boundaries=True``)."""
    prefill: str
    """The assistant text being continued (``continue_final_message``), else ``""``."""


def template_options(chat_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Chat-template options with our defaults: a generation prompt unless continuing the last message."""
    options = dict(chat_options or {})
    continuing = bool(options.get("continue_final_message", False))
    options.setdefault("add_generation_prompt", not continuing)
    if continuing and options["add_generation_prompt"]:
        raise ChatError("chat_options: continue_final_message and add_generation_prompt cannot both be True")
    return options


def format_conversation(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    chat_options: Mapping[str, Any] | None = None,
    with_boundaries: bool = False,
) -> FormattedConversation:
    """Render and tokenize one validated conversation."""
    options = template_options(chat_options)
    continuing = bool(options.get("continue_final_message"))
    if continuing and conversation[-1]["role"] != "assistant":
        raise ChatError(
            "continue_final_message needs the last message to be the assistant's prefill, "
            f"got role {conversation[-1]['role']!r}"
        )
    text = tokenizer.apply_chat_template(conversation, tokenize=False, **options)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=with_boundaries)
    token_ids = list(encoded["input_ids"])
    boundaries: tuple[MessageBoundary, ...] = ()
    if with_boundaries:
        boundaries = _boundaries(tokenizer, conversation, options, text, encoded["offset_mapping"])
    return FormattedConversation(token_ids, boundaries, conversation[-1]["content"] if continuing else "")


def _boundaries(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    options: dict[str, Any],
    text: str,
    offsets: Sequence[tuple[int, int]],
) -> tuple[MessageBoundary, ...]:
    prefix_options = {**options, "add_generation_prompt": False, "continue_final_message": False}
    starts = [0]
    for count in range(1, len(conversation)):
        prefix = tokenizer.apply_chat_template(conversation[:count], tokenize=False, **prefix_options)
        if not text.startswith(prefix):
            raise ChatError(
                "cannot place message boundaries: this chat template renders the first "
                f"{count} messages differently inside the full conversation"
            )
        char = len(prefix)
        # The first token starting at or after the message's first character.
        starts.append(next((i for i, (begin, _) in enumerate(offsets) if begin >= char), len(offsets)))
    ends = starts[1:] + [len(offsets)]
    return tuple(
        MessageBoundary(role=message["role"], content=message["content"], start=start, end=end)
        for message, start, end in zip(conversation, starts, ends)
    )
