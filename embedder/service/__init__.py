"""The gRPC service: servicers, micro-batching, interceptors, server assembly."""
