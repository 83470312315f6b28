"""What admins read: /metrics for Prometheus, the Nagios check, everything about one VM, the
status page with its JSON endpoint and time series (and what `vacfactory top` shows)."""
