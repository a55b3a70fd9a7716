"""A deadline for receiving each request in full, below the app.

A request must arrive in full (headers and body) within ``request_timeout`` seconds of the
connection opening or of the previous answer, or the connection is closed: uvicorn has no such
timeout, so a subclass of its h11 protocol keeps one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S = 10.0


class ReceiptTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for receiving each request in full.

    The clock starts when the connection opens and again when an answer has been sent; it stops
    when h11 has the whole request (headers and body). A client still sending when it runs out,
    however slowly it drips its bytes, is disconnected: uvicorn's own ``timeout_keep_alive`` only
    covers the idle time between requests and restarts on every byte received.
    """

    receipt_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    _deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.receipt_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.debug("closing a connection from %s: no complete request within %.1f s", self.client,
                      self.receipt_timeout)
            self.transport.close()


def receipt_timeout_protocol(seconds: float) -> type:
    """:class:`ReceiptTimeoutProtocol` with its deadline set to ``seconds``, for uvicorn's ``http=``."""
    return type("ReceiptTimeoutProtocol", (ReceiptTimeoutProtocol,), {"receipt_timeout": float(seconds)})
