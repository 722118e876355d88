"""Load benchmark: the service against python-socketio and Node Socket.IO, with two framework-free
references (lean-python, lean-node), as real processes over loopback.

    .venv/bin/python -m tests.load [--quick] [--scale N] [--out docs/bench]

See docs/benchmark.md for the workloads, the conditions and the latest figures.
"""
