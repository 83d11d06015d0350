"""Experiment infrastructure for cold-start benchmarks.

* ``netshape`` / ``delayproxy``: a registry behind a shaped link (tbf in a network namespace
  for bandwidth, a delay proxy for round-trip time).
* ``images``: realistic benchmark images built offline from recipes, cached, pushed to a registry.
"""
