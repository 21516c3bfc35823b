"""Generated gRPC/protobuf code for the vera.v1 contract (source of truth: proto/vera/v1/*.proto)."""
