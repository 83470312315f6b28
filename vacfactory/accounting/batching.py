"""Packing queued job records into fewer APEL messages (``apel_batch``), for large sites.

Each queued element stays one VM's ``APEL-individual-job-message: v0.3`` (archive, queue,
``apel republish`` and ``apel sync`` are unchanged); only the sender packs consecutive job
elements into one message: the header once, then every element's records, each ending with
``%%``. A batch holds at most ``apel_batch_records`` records and MAX_BATCH_BYTES of text, so
signed, base64-encoded and wrapped in AMS's JSON it stays well under AMS's 1 MB limit.

APEL rejects a message as a whole when one record is invalid, so every element is parsed
before it joins a batch (the sender does), and an element that does not parse is never packed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from vacfactory.core.apel import JOB_HEADER

#: AMS refuses messages over 1 MB (its documented limit)
AMS_MAX_MESSAGE_BYTES = 1_000_000
#: one batch as signed text (S/MIME ``-text`` turns every LF into CRLF, so each line counts one
#: more): base64 adds a third and the signature a few kB, so 700 kB become < 0.94 MB on the
#: wire (tests/unit/test_apel_batching.py signs the worst case and checks)
MAX_BATCH_BYTES = 700_000


def signed_size(text: str) -> int:
    """Bytes of ``text`` once S/MIME ``-text`` signing made every line end in CRLF."""
    return len(text) + text.count("\n")


@dataclass
class Batch:
    """Job elements waiting to go out as one message."""

    limit_records: int
    names: List[str] = field(default_factory=list)
    bodies: List[str] = field(default_factory=list)
    records: int = 0
    size: int = signed_size(JOB_HEADER + "\n")

    def fits(self, body: str, records: int) -> bool:
        """Would one more element (with ``records`` records) keep the batch within its limits?"""
        if not self.names:
            return True
        return (self.records + records <= self.limit_records
                and self.size + signed_size(body) - signed_size(JOB_HEADER + "\n") <= MAX_BATCH_BYTES)

    def add(self, name: str, body: str, records: int) -> None:
        self.names.append(name)
        self.bodies.append(body)
        self.records += records
        self.size += signed_size(body) - signed_size(JOB_HEADER + "\n")

    def full(self) -> bool:
        return self.records >= self.limit_records

    def text(self) -> str:
        return pack_job_messages(self.bodies)


def pack_job_messages(bodies: List[str]) -> str:
    """One job message holding the records of several (each starts with JOB_HEADER)."""
    parts = [JOB_HEADER, "\n"]
    for body in bodies:
        header, _, rest = body.replace("\r\n", "\n").partition("\n")
        if header.strip() != JOB_HEADER:
            raise ValueError(f"not a job message: {header!r}")
        parts.append(rest if rest.endswith("\n") else rest + "\n")
    return "".join(parts)
