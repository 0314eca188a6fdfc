"""Operating a pool: the launcher and its restart policy, CPU topology, core placement and pinning,
capacity planning, model preparation and certificates."""
