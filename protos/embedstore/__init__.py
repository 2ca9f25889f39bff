"""embedstore gRPC API (generated from protos/embedstore/v1/*.proto)."""
