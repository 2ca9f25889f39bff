"""embedstore.v1: generated protobuf and gRPC modules (do not edit; run `make protos`)."""
