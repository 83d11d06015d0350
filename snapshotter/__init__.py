"""The lazyfs containerd remote snapshotter (a separate process from the daemon)."""
