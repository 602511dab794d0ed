"""The gRPC server: any store's three services under the tvix and snix protocol names."""
