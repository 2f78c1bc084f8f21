"""Entry points: the ``hfi`` command and one module per containerized pipeline step.

Each parses its arguments, calls one ``hfi_core`` function, prints or records the result and
exits. Nothing here holds logic a test would need to reach.
"""
