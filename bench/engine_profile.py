"""``flask dispatcher run`` under yappi (every thread, CPU clock): for profiling the engine.

    B24RELAY_BENCH_PROFILE=/tmp/engine.prof python -m bench.engine_profile
"""

from __future__ import annotations

import os
import signal
import threading

import yappi


def main() -> None:
    """Run an engine until SIGTERM; write the profile (pstat) and a text summary."""
    from app import create_app
    from app.dispatcher.engine import Engine

    yappi.set_clock_type("cpu")
    yappi.start()
    app = create_app()
    engine = Engine(app).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"dispatcher {engine.owner} running", flush=True)
    stop.wait()
    engine.stop(timeout=10)
    yappi.stop()
    out = os.environ["B24RELAY_BENCH_PROFILE"]
    yappi.get_func_stats().save(out, type="pstat")
    with open(out + ".txt", "w") as fh:
        yappi.get_func_stats().sort("tsub").print_all(out=fh, columns={
            0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8), 4: ("tavg", 8)})
        yappi.get_thread_stats().print_all(out=fh)


if __name__ == "__main__":
    main()
