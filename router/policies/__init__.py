"""Routing policies, one class per module; `tierserve.router.policies.registry` registers them by name."""
