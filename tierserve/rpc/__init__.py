"""RPC plumbing shared by the router and the workers: the gRPC server skeleton, TLS credentials,
request decoding, the metrics endpoint, tracing, small client calls, and the contract's tooling
(stub and API-doc generation)."""
