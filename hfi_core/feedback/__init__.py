"""Human feedback: Label Studio round trip, ingest and validation, and simulated annotators."""
