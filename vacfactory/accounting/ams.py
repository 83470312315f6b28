"""Publish signed APEL messages to ARGO AMS through ``argo-ams-library``, as SSM does.

SSM's AMS path (``protocol: AMS``): one ``ArgoMessagingService(endpoint=host,
project=ams_project, token=token | cert=..., key=...)``; with no token the library exchanges
the host certificate for one (``GET https://HOST:8443/v1/service-types/ams/hosts/HOST:authx509``);
then for every queued element one ``publish(destination, AmsMessage(data=SIGNED,
attributes={'empaid': NAME}))``, which POSTs ``{"messages": [{"attributes": {"empaid": NAME},
"data": BASE64}]}`` to ``https://HOST/v1/projects/PROJECT/topics/TOPIC:publish`` and returns
``{"messageIds": [...]}``. The element is removed only after that answer.

Where we do better than SSM: the token exchange and every publish are bounded by the run's
deadline (the library's exchange has no timeout); the library's re-send after a 5xx, a reset
or a timeout is only asked for while the deadline leaves room for its sleep; every failure
says what to check. A re-send of a message AMS had already stored gives a duplicate, which
APEL's REPLACE key absorbs; a message is never removed without its message id.
The server certificate is checked against the requests CA bundle (``REQUESTS_CA_BUNDLE`` or
the system's), as with SSM, not against capath.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import requests
from argo_ams_library import AmsMessage, ArgoMessagingService
from argo_ams_library.amsexceptions import (
    AmsBalancerException,
    AmsConnectionException,
    AmsException,
    AmsServiceException,
    AmsTimeoutException,
)

from vacfactory.accounting.send_errors import TimedOut, Unreachable
from vacfactory.accounting.settings import BrokerSettings
from vacfactory.errors import AccountingError

log = logging.getLogger(__name__)

#: the header SSM puts on every AMS message: the dirq element name
EMPAID = "empaid"
_HINTS = {
    401: "the token or host certificate was not accepted: is the certificate's DN, exactly, the Host DN "
         "of the site's gLite-APEL service in GOCDB?",
    403: "not allowed to publish to this topic: is the site's gLite-APEL service registered in GOCDB?",
    404: "no such project or topic",
    409: "AMS refused the message (conflict)",
    413: "the message is over AMS's size limit",
}


class AmsLink:
    """The AMS side of one sender run: token exchange once, then one publish per message."""

    def __init__(self, broker: BrokerSettings, deadline: float) -> None:
        if not broker.host:
            raise AccountingError("no AMS host (sender.cfg [broker] host)")
        self.broker = broker
        self.where = f"AMS {broker.host} project {broker.ams_project}"
        self.service: Optional[ArgoMessagingService] = None

    def open(self, deadline: float) -> None:
        """Get a token: the configured one, or the library's X.509 exchange (bounded)."""
        b = self.broker
        if b.ams_token:
            self.service = ArgoMessagingService(endpoint=b.host, token=b.ams_token, project=b.ams_project,
                                                authn_port=b.ams_authn_port)
            return

        def exchange() -> ArgoMessagingService:
            return ArgoMessagingService(endpoint=b.host, project=b.ams_project, cert=b.host_cert, key=b.host_key,
                                        authn_port=b.ams_authn_port)

        try:
            self.service = _bounded(exchange, deadline, "the X.509 token exchange")
        except (AmsException, requests.RequestException, OSError) as error:
            raise _explain(error, f"{self.where}: token exchange on port {b.ams_authn_port}") from None
        log.debug("%s: token obtained with %s", self.where, b.host_cert)

    def send(self, destination: str, body: str, name: str, deadline: float) -> None:
        """Publish one signed message; return only when AMS gave its message id."""
        assert self.service is not None, "open() first"
        service = self.service
        b = self.broker
        left = deadline - time.monotonic()
        timeout = max(0.1, min(b.ams_timeout_seconds, left))
        # a re-send only if the sleep and a second attempt still fit before the deadline
        retry = b.ams_retry if left > timeout + b.ams_retry_sleep_seconds + timeout else 0
        message = AmsMessage(data=body, attributes={EMPAID: name}).dict()

        def publish() -> Dict[str, Any]:
            return service.publish(destination, message, retry=retry, retrysleep=b.ams_retry_sleep_seconds,
                                   timeout=timeout)

        try:
            answer = _bounded(publish, deadline, f"publishing {name}")
        except (AmsException, requests.RequestException, OSError) as error:
            raise _explain(error, f"{self.where}: topic {destination}: {name}") from None
        ids = answer.get("messageIds") if isinstance(answer, dict) else None
        if not (isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], str) and ids[0]):
            raise AccountingError(f"{self.where}: topic {destination}: {name}: no message id in the answer "
                                  f"({str(answer)[:200]!r}); left queued")
        log.debug("%s: %s published as AMS message %s", self.where, name, ids[0])

    def close(self, budget: float) -> None:
        """Nothing to close: every request had its own connection."""
        self.service = None


def _explain(error: Exception, what: str) -> AccountingError:
    """The library's exception as our error: unreachable (exit 69) or refused, with a hint."""
    text = getattr(error, "msg", None) or str(error) or type(error).__name__
    if isinstance(error, (AmsConnectionException, AmsTimeoutException, AmsBalancerException,
                          requests.RequestException, OSError)):
        return Unreachable(f"{what}: {text}")
    code = getattr(error, "code", None) if isinstance(error, AmsServiceException) else None
    hint = _HINTS.get(code, "") if isinstance(code, int) else ""
    return AccountingError(f"{what}: AMS answered {code or 'an error'}: {text}" + (f" ({hint})" if hint else ""))


def _bounded(function: Callable[[], Any], deadline: float, what: str) -> Any:
    """Run a library call in a daemon thread; TimedOut if it has not returned by the deadline.

    The call may still finish later (its message would then arrive twice at most, since the
    element stays queued): a duplicate is harmless, a hung sender is not.
    """
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append((True, function()))
        except BaseException as error:  # handed to the caller's thread, re-raised there
            outcome.append((False, error))

    thread = threading.Thread(target=run, name="vacfactory-ams", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not outcome:
        raise TimedOut(f"{what}: no answer before the deadline; left queued")
    ok, value = outcome[0]
    if ok:
        return value
    raise value
