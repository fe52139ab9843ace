"""The gRPC front door: servicer, codec, interceptor, status mapping, transport, metrics, process lifecycle."""
