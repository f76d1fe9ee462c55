"""A JSON request body whose top-level values stay JSON text until they are read.

A request with a spec inline carries ~700 kB of JSON (a 4096-vector on each
of 32 layers in base64), and the server's event loop, which also streams
every reply, read each such body whole: ~1.4 ms per request on an H100 host,
and a burst of 64 requests waited ~150 ms for the last to be read. Split at
the top level only (msgspec, which vLLM depends on, skips over the values),
the steering field is looked up by its text (``RecentSpecs``) and decoded
only the first time it is seen; the other fields are small. Each value is
decoded with the standard library, as vLLM's own routes decode bodies (so
``NaN`` and ``1e999`` mean what they mean there).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from workbench.errors import SpecError

_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])


class RequestBody(Mapping[str, Any]):
    """A JSON object's top-level values as JSON text, each decoded when read (``body[key]``)."""

    def __init__(self, texts: dict[str, bytes]) -> None:
        self._texts = texts
        self._values: dict[str, Any] = {}

    @classmethod
    def parse(cls, body: bytes) -> RequestBody | None:
        """The body split at its top level; None when it is not a JSON object."""
        texts = _top_level(body)
        if texts is not None:
            return cls(texts)
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(value, dict):
            return None
        return cls({key: json.dumps(item).encode() for key, item in value.items()})

    def pop_text(self, key: str) -> bytes | None:
        """Remove a field, returning its JSON text (None when absent)."""
        self._values.pop(key, None)
        return self._texts.pop(key, None)

    def set(self, key: str, value: Any) -> None:
        self._texts[key] = json.dumps(value).encode()
        self._values[key] = value

    def encode(self) -> bytes:
        """The body as JSON, its untouched values as they were sent."""
        return b"{" + b",".join(json.dumps(key).encode() + b":" + text for key, text in self._texts.items()) + b"}"

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            self._values[key] = decode_field(self._texts[key], key)
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._texts

    def __iter__(self) -> Iterator[str]:
        return iter(self._texts)

    def __len__(self) -> int:
        return len(self._texts)


def _top_level(text: bytes) -> dict[str, bytes] | None:
    """A JSON object's values as JSON text, by key; None when ``text`` is not a JSON object
    in strict JSON (``NaN``, ``1e999`` and lone surrogates are not)."""
    try:
        return {key: bytes(value) for key, value in _TOP_LEVEL.decode(text).items()}
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def decode_field(text: bytes, field: str) -> Any:
    """A field's value from its JSON text (a ``SpecError`` naming the field when the text is not JSON)."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise SpecError(f"{field} is not valid JSON: {error}") from None
