//! End-to-end tests: the mesh over real gRPC sockets
