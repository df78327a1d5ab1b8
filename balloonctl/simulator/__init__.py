"""Replay guest memory-demand traces through balloon policies.

The simulator feeds a guest model with the demand a trace file gives,
requests balloon targets from a policy once per stats period, and measures
how much memory each policy releases to the host and what that costs the
guests.
docs/simulator.md describes the model, the trace format and the policies.
"""
