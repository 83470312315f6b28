"""How a sender run can fail, shared by the STOMP and AMS transports."""

from __future__ import annotations

from vacfactory.errors import AccountingError


class Unreachable(AccountingError):
    """No connection to the broker or AMS, or it was lost (CLI exit 69)."""


class TimedOut(AccountingError):
    """The overall deadline came before everything queued was confirmed."""

    def __init__(self, message: str, *, between_messages: bool = False) -> None:
        super().__init__(message)
        #: True: no message was in flight (none failed), the rest was simply not started
        self.between_messages = between_messages
