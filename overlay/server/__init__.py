"""The gRPC side: servicers, the exception ↔ status table, the daemon."""
