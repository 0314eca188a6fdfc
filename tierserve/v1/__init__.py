"""Generated gRPC stubs for the tierserve.v1 wire contract (see protos/)."""
