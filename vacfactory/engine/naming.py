"""Names of this factory's VMs: ``<factory-short>-NN.<domain>``, as Vac names its slots.

The domain name doubles as the VM's hostname. Anything on the hypervisor that matches this
factory's pattern but is not a live VM of ours is a zombie and gets destroyed, so the pattern
must never match another factory's VMs (the short name is part of it).
"""

from __future__ import annotations

import re
from typing import Pattern, Tuple


def split_factory_name(factory_name: str) -> Tuple[str, str]:
    """``f1.example.org`` -> (``f1``, ``example.org``); the config guarantees a dot."""
    short, _, domain = factory_name.partition(".")
    return short, domain


def domain_name(factory_name: str, slot: int) -> str:
    short, domain = split_factory_name(factory_name)
    return f"{short}-{slot:02d}.{domain}"


def domain_pattern(factory_name: str) -> Pattern[str]:
    short, domain = split_factory_name(factory_name)
    return re.compile(rf"\A{re.escape(short)}-[0-9]{{2,3}}\.{re.escape(domain)}\Z")
