"""The service's error: what a request is refused with, and its HTTP status. Free of
FastAPI, so the service (and the CLI that starts it) load without the web stack;
mondrian.serve.http gives it its HTTP shape."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service refuses or cannot answer; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
