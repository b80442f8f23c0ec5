"""Tests of the libvirt provider's real guest."""
