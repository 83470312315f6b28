"""APEL accounting: archive, dirq outgoing queue, sync records and the sender (STOMP or AMS).

The engine's whole surface::

    settings = AccountingSettings.from_config(config)
    result = account_vm(usage, settings, now, fizzle_seconds=...)   # then mark accounted
    results = account_vms(usages, settings, now)                    # several at once
    sync_if_due(settings, now)                                      # every cycle; daily work
    sync_at_stop(settings, now)                                     # after the final flush
    if send_is_due(settings, last, now): send_queued(settings, timeout)
"""

from __future__ import annotations

from vacfactory.accounting.account import AccountResult, account_vm, account_vms
from vacfactory.accounting.records import VMUsage
from vacfactory.accounting.republish import RepublishResult, republish
from vacfactory.accounting.sender import SendResult, send_is_due, send_queued
from vacfactory.accounting.settings import AccountingSettings, BrokerSettings
from vacfactory.accounting.sync import SyncResult, sync_at_stop, sync_if_due, sync_month, sync_records

__all__ = [
    "AccountResult",
    "AccountingSettings",
    "BrokerSettings",
    "RepublishResult",
    "SendResult",
    "SyncResult",
    "VMUsage",
    "account_vm",
    "account_vms",
    "republish",
    "send_is_due",
    "send_queued",
    "sync_at_stop",
    "sync_if_due",
    "sync_month",
    "sync_records",
]
