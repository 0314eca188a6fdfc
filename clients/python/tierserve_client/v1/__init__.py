"""Generated gRPC stubs and messages of the tierserve.v1 wire contract (see protos/ in the repo)."""
