"""Vera Edit host side: the gRPC client, the `vera` CLI, the Qt panel and host adapters."""
