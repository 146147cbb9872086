"""Benchmark suite for forge-streaming (run: ``python -m forge_streaming_bench``).

The harness starts every server under test as its own process on a free
loopback port, drives it from a separate load-generator process (a raw
asyncio WebSocket client on uvloop that parses only frame headers), reads
the server's CPU time from /proc and writes BENCHMARKS.md plus a PNG.
"""

__version__ = "0.1.0"
