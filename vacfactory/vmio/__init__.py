"""The boundary with the VMs: everything a VM reads or writes passes through here.

- :mod:`.registry` — which VM is which: endpoints indexed by private address and by token.
- :mod:`.http` — MJF (``169.254.169.253``) and metadata (``169.254.169.254``) over
  HTTP/1.1, plus ``PUT /joboutputs/NAME``; one selectors thread, bounded everything.
- :mod:`.joboutputs` — the VM's ``joboutputs`` directory read as hostile input
  (``read_shutdown_message``, ``heartbeat_mtime``, ``scan``, ``enforce_limits``).
- :mod:`.exports` — NFS exports per VM: nfs-ganesha (SIGHUP reload), kernel exportfs, none.
- :mod:`.configdrive` — OpenStack ``config-2`` ISO for images that boot from CD.
- :mod:`.proxy` — limited RFC 3820 X.509 proxy expiring at the VM's shutdown time.

The submodules are imported explicitly by their users so that, for example, the CLI does not
pay for ``cryptography`` or ``pycdlib`` when it only needs the registry.
"""
