"""The boundary with the VMs: MJF/metadata over HTTP, NFS exports, joboutputs (hostile input)."""
