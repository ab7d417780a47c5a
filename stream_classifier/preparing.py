"""The prepare stage: tokenizing each event for the engine, off the loop when it can be.

``engine.prepare`` runs once per event. :class:`InlinePreparer` runs it on the calling
thread (the Kafka thread) and hands back a finished future; other preparers may run it
elsewhere (worker processes) so that the loop and the thread driving the GPU do not
share the interpreter lock with tokenizing. Futures come back in any order; the service
takes events in their consumed order regardless.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

from stream_classifier.engine.base import Engine, Prepared


class Preparer(Protocol):
    def submit(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Future[Prepared]: ...
    def shutdown(self) -> None: ...


class InlinePreparer:
    """``engine.prepare`` on the caller's thread; a failure is in the returned future."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Future[Prepared]:
        future: Future[Prepared] = Future()
        try:
            future.set_result(self.engine.prepare(text, labels, template, multi_label))
        except Exception as exc:  # noqa: BLE001 - the service dead-letters the event
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        pass
