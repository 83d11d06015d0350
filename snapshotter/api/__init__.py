"""containerd's Snapshots gRPC API: .proto copies and the Python code build.py generates from them."""
