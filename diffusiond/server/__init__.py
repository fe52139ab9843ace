"""The gRPC service: servicer, request engine, status mapping, process lifecycle."""
