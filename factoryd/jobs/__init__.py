"""Provisioning jobs: the per-board pipeline and the per-port scheduler."""
