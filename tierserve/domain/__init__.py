"""Configuration and domain types shared by every process: the config schema, request validation,
tier names, accuracy loss, latency windows, domain errors and their gRPC status table."""
