"""The ``libvirt`` provider: real VMs on libvirt/KVM (or TCG where KVM does not work),
and the small Debian guest the tests and the lab boot (:mod:`.guest_image`)."""
