"""Presenting attached layers to the kernel: the filesystem model (layerfs), the thin pyfuse3
adapter (fuse), chunk devices (devices), metadata residency and mount plumbing. Builds on
fetch/; knows nothing of the daemon process. The home of serving modes."""
