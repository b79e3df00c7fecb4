"""The error every refused request becomes: Personalizer's status, code and message. Raised by
the request parsing and ranking rules (service.core.requests, service.core.ranking) that the
API and the in-process ranker (service.local) share, so both refuse bad input with the same code
and message; service.api.errors turns one into the response body."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds (429, 503): sent as Retry-After


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)
