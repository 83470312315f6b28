"""Scheduling quality on a simulated space: workloads that run out of work, share changes, and
Vac 03.01's policy beside this factory's (``vacfactory simulate --workload``, ``make bench``)."""
