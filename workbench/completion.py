"""Generated text as ``generate`` returns it: a ``str`` that also says
whether steering broke the request's residual stream."""

from __future__ import annotations


class Completion(str):
    """The generated text (what ``str()`` gives).

    ``nonfinite_layer`` is the first layer at which steering broke the
    request's residual stream (inf, NaN, or a norm too large for the next
    layer's norm, ``ops.NORM_LIMIT``): the text after that is not the
    model's, often empty. ``None`` when the stream stayed sound.
    """

    nonfinite_layer: int | None

    def __new__(cls, text: str, nonfinite_layer: int | None = None) -> Completion:
        completion = super().__new__(cls, text)
        completion.nonfinite_layer = nonfinite_layer
        return completion

    @property
    def text(self) -> str:
        return str.__str__(self)

    @property
    def is_finite(self) -> bool:
        return self.nonfinite_layer is None

    def __repr__(self) -> str:
        flag = "" if self.nonfinite_layer is None else f", nonfinite_layer={self.nonfinite_layer}"
        return f"{type(self).__name__}({self.text!r}{flag})"
