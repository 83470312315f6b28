"""The hypervisor boundary: a narrow interface and its libvirt implementation."""
