"""The syslog receiver: VMs' syslog messages, filed under each VM's machine directory.

Why: to investigate what happened inside a VM (a security incident, a misbehaving pilot) a site
needs the VM's own logs after the VM is gone. VMs learn the server from ``machinefeatures/syslog``
or ``##user_data_syslog_server##`` (default ``169.254.169.254:514``, the factory itself on the
private network) and point rsyslog at it early in boot.

This module is part of the VM boundary, so it opens UDP sockets (as ``space/`` does for
VacQuery) and treats every datagram as hostile:

- Who sent it is decided by the source address only (``resolver``: source IP -> the VM's
  machine directory, from the VM registry); the hostname a message claims is kept as text but
  never trusted. Datagrams from unknown addresses are dropped and counted.
- A datagram is read into a bounded buffer (:attr:`SyslogLimits.max_datagram`, 8 KiB; more is
  cut and counted as truncated), parsed leniently as RFC 5424 or RFC 3164 (anything else is
  kept whole as the message), and every field is reduced to printable text: control
  characters, C1 controls, Unicode format characters (bidi overrides) and line separators are
  written as rsyslog does, ``#ooo`` (or ``#uXXXX``), so one datagram is always one line and no
  log line can rewrite an admin's terminal. The parser never raises.
- Each VM has its own token bucket (``rate_per_second`` with ``burst``): the receive loop is
  one thread and a datagram over the limit costs a lookup and a subtraction, so a VM flooding
  the receiver cannot starve another VM's messages (nor fill the disk, nor the forward link).
  Drops for the rate are summarised in the VM's file (and logged) at most once a minute.
- Each VM's files are capped at ``max_bytes_per_vm`` in total; when the cap is reached one last
  line says so, filing stops and the drops are counted (logged once per VM).
- Files are opened relative to directory descriptors opened with ``O_NOFOLLOW``, the log file
  with ``O_APPEND|O_NOFOLLOW|O_NONBLOCK`` and checked to be a regular file with one link: no
  symlink, FIFO or device is ever written through.

Files: ``<machine_dir>/syslog/messages``, rotated at midnight UTC (while the receiver writes) to
``messages-YYYYMMDD`` (the UTC day of its last line). One line per message::

    RECEIVED FACILITY.SEVERITY VM_TIME HOST APP[PROCID]: [msgid=ID ][STRUCTURED-DATA ]MESSAGE

``RECEIVED`` is the factory's clock (RFC 3339 UTC, milliseconds) and the one to trust;
``VM_TIME`` is the time the message claims (RFC 3339 as sent, or an RFC 3164 time with the year
inferred; ``-`` if none): rsyslog replays messages queued before the network came up with
their original times, so both matter for a timeline. ``HOST``, ``APP`` and ``PROCID`` are what
the VM claims (``-`` when absent). Every field before the colon is free of spaces.

Retention: :func:`expire` (called by the daemon) deletes files whose last line is older than
``syslog_days``; a machine directory deleted earlier (``machines_dir_days``) takes its syslog
with it. Open files are closed after :data:`IDLE_CLOSE_SECONDS` without messages, and as soon
as the resolver no longer knows the VM, so a deleted directory is never written to for long.

Forwarding (``syslog_forward``): every message that passes the rate limit (also after the local
cap is reached: the central syslog is where long-term evidence lives) is sent on as RFC 5424,
with the receive time, the VM's hostname as the factory named it (vm.json), the VM's
facility/severity/app/procid/msgid, ``[origin ip="<VM address>" software="vacfactory"]``, and
the same sanitised text as the local line.

The parts: :mod:`.message` (datagrams into safe messages and lines; pure), :mod:`.policy`
(where the receiver listens, who a source is, rates and caps), :mod:`.files` (the VM's files
on disk, rotation, retention), :mod:`.receiver` (sockets, the thread, forwarding).
"""

from vacfactory.vmio.syslogd.files import ExpireResult, SyslogFile, expire, syslog_files
from vacfactory.vmio.syslogd.message import SyslogMessage, escape_text, format_forward, format_line, parse_message
from vacfactory.vmio.syslogd.policy import (DEFAULT_SERVER, FACTORY_ADDRESSES, SyslogLimits, parse_hostport,
                                            receiver_address, registry_resolver)
from vacfactory.vmio.syslogd.receiver import SyslogReceiver, SyslogStats

__all__ = ["ExpireResult", "SyslogFile", "expire", "syslog_files", "SyslogMessage", "escape_text", "format_forward",
           "format_line", "parse_message", "DEFAULT_SERVER", "FACTORY_ADDRESSES", "SyslogLimits", "parse_hostport",
           "receiver_address", "registry_resolver", "SyslogReceiver", "SyslogStats"]
