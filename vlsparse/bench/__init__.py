"""Benchmarks: end to end (``e2e``: ``vlsparse bench e2e``) and the timers they share with ``vlsparse eval`` (``timing``)."""
