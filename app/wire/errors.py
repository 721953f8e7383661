"""The wire layer's one error type: what was wrong with a request, and the HTTP status it deserves."""

from __future__ import annotations


class WireError(ValueError):
    """A request body or header the wire layer refuses.

    `status` is 400 when the body cannot be parsed at all and 422 when it parses but is invalid (subclasses
    use 406 and 415); `detail` is one sentence saying what was wrong and what is allowed; `field` names the
    offending member (e.g. `grads.w`) when there is one.
    """

    status: int
    detail: str
    field: str | None

    def __init__(self, detail: str, *, status: int = 422, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, field={self.field!r}, detail={self.detail!r})"
