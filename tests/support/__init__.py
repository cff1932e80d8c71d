"""Helpers the unit and the integration tests share (tests/ is on sys.path: pyproject's
``pythonpath``): waiting for an event with a deadline (``waiting``) and HTTP from
inside a namespace (``http``). Traffic between namespaces (ping, TCP streams and
transfers, free ports) is the lab's: udpflannel/lab/probe.py."""
