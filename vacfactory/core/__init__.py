"""The pure core: decisions from plain values. No I/O, no adapters, ``now`` passed in."""
