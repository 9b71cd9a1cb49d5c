"""proxynode's benchmark harness (issue 5): helpers shared by the suites.

Self-contained: nothing here imports from tests/. Everything runs on
loopback, every wait is bounded, and every process started here is
registered in util.PROCS so that run.py can stop it on any exit."""
