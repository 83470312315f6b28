"""The engine's collaborators: mapping configuration onto core values and adapters.

``vacfactory/factory.py`` runs the loop; the modules here keep it short: ``policies`` turns
the configuration into the core's plain values, ``naming`` owns domain names, ``vmbuild``
turns a machinetype into a domain description (disks, kernel, network), ``boundary`` wires
the VM boundary (HTTP registry, NFS exports, joboutputs) and ``accountant`` the APEL step.
"""
