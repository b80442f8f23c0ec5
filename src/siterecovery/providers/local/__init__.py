"""The ``local`` provider: lab VMs made of a qemu-storage-daemon and a guest workload."""
