"""Kubernetes' CRI (runtime.v1): the .proto subset the tests use and the client build.py generates."""
