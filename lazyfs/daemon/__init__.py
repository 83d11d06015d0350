"""The daemon process and what talks to it: the process itself (server, run as
``python -m lazyfs.daemon``), attaching layers, image resolution, per-mount state and the
control-protocol client. Importing this package or its ``control`` and ``mountstate``
modules pulls in neither trio nor pyfuse3: the CLI and the snapshotter use them."""
