"""Routing policies, one class per module; `router.policy` registers them by name."""
