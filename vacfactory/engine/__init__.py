"""The engine: the loop that keeps the hypervisor full of VMs, and its collaborators.

``factory`` runs the loop (gather facts -> lifecycle events, core.lifecycle -> actions;
decide; create). Each step has its own module: ``entries`` (one VMEntry per VM), ``creation``
(a round's VMs, started in parallel), ``ending`` (how a VM ended), ``settling`` (accounting and
cleaning), ``pause``, ``retention``, ``drain``, ``clockstep``, ``configpoll``, ``report``. The
mapping of configuration onto core values and adapters: ``policies`` turns the configuration
into the core's plain values, ``naming`` owns domain names, ``vmbuild`` describes a VM's domain
(disks, kernel, network), ``boundary`` wires the VM boundary (HTTP registry, NFS exports,
joboutputs) and ``accountant`` the APEL step.
"""
