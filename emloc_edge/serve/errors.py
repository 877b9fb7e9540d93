"""Errors as the OpenAI API shapes them: `{"error": {"message", "type", "param", "code"}}` with a status.

Library errors map to statuses by class (STATUS); the serve layer adds the HTTP-only ones."""
from __future__ import annotations

from ..errors import BadInputError, EmlocError, MemoryFileError, ModelLoadError, ModelMismatchError


class UnknownMemoryError(EmlocError):
    """No *.emloc of that name in the memories folder."""


class PayloadTooLargeError(BadInputError):
    """The body or an image is over its limit."""


class UnsupportedMediaError(BadInputError):
    """A content type or image media type the server does not take."""


class AuthError(EmlocError):
    """Missing or wrong API key."""


class TimeoutError_(EmlocError):
    """The request ran past its time limit."""


# most specific first: isinstance picks the first match
STATUS: list[tuple[type[BaseException], int, str]] = [
    (AuthError, 401, "authentication_error"),
    (UnknownMemoryError, 404, "not_found_error"),
    (PayloadTooLargeError, 413, "invalid_request_error"),
    (UnsupportedMediaError, 415, "invalid_request_error"),
    (ModelMismatchError, 409, "invalid_request_error"),
    (BadInputError, 400, "invalid_request_error"),
    (TimeoutError_, 504, "timeout_error"),
    (MemoryFileError, 500, "server_error"),
    (ModelLoadError, 500, "server_error"),
]


class APIError(Exception):
    """An error as it goes on the wire. Plain and picklable (crosses Ray's process boundaries as is)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(status, message, type_, code, param)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(exc: BaseException) -> APIError:
    """The wire form of any exception (an unexpected one is a 500 naming only its class)."""
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None)  # a Ray task error wraps the replica's exception
    if isinstance(cause, BaseException) and cause is not exc:
        return api_error(cause)
    for cls, status, kind in STATUS:
        if isinstance(exc, cls):
            code = {404: "model_not_found", 401: "invalid_api_key", 409: "model_mismatch"}.get(status)
            return APIError(status, str(exc), kind, code)
    return APIError(500, f"internal error ({type(exc).__name__})", "server_error")
