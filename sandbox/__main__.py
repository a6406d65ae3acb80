"""`python -m sandbox --port N [--app-url URL] [--portals K] [--https]`: run the fake cloud until
SIGINT/SIGTERM.

Unlike the pytest plugin's server it behaves like Bitrix24 out of the box: 50-600 ms a
request (``--latency``), events 0.5-3 s late and in no guaranteed order (``--event-delay``,
``--event-order``).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from . import latency
from .client import SandboxControl
from .server import SandboxServer

# Bitrix24's queue server delivers seconds later (protocol §3.2); the tests' default is 0.
EVENT_DELAY = "500,3000"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        prog="python -m sandbox", description="Fake Bitrix24 cloud on loopback"
    )
    ap.add_argument(
        "--port", type=int, default=0, help="cloud port (auth server + control API); 0 = free port"
    )
    ap.add_argument(
        "--app-url", default=None, help="the app's public base URL (installer at <url>/install)"
    )
    ap.add_argument("--portals", type=int, default=0, help="create K portals at start")
    ap.add_argument("--plan", default="standard", choices=["standard", "enterprise"])
    ap.add_argument("--client-id", default="app.sandbox")
    ap.add_argument("--client-secret", default="sandbox-secret")
    ap.add_argument(
        "--install",
        action="store_true",
        help="POST the installer at --app-url for each portal, then finish the install by the "
        "control call (no browser runs the page's script)",
    )
    ap.add_argument("--token-ttl", type=int, default=None)
    ap.add_argument(
        "--iframe-form",
        choices=["full", "short"],
        default=None,
        help="the iframe POST form portals send by default (protocol §2.3; default full)",
    )
    ap.add_argument("--operating-limit", type=float, default=None)
    ap.add_argument(
        "--https",
        action="store_true",
        help="serve every port over TLS with a certificate from a CA made at start "
        "(PROTOCOL=1, https endpoints); the CA file is printed: give it to the app as "
        "B24_CA_BUNDLE",
    )
    ap.add_argument(
        "--latency",
        type=latency.parse_text,
        default=latency.REALISTIC,
        help="per-request latency in ms: N, LO,HI or realistic (default: realistic, 50-600 ms)",
    )
    ap.add_argument(
        "--event-delay",
        type=latency.parse_text,
        default=EVENT_DELAY,
        help=f"delay of each event delivery in ms: N, LO,HI or realistic (default {EVENT_DELAY})",
    )
    ap.add_argument(
        "--event-order",
        choices=["any", "queued"],
        default="any",
        help="any: each event waits only its own delay, later ones may overtake (default, as "
        "Bitrix24); queued: one after another in queue order",
    )
    ap.add_argument("--json", action="store_true", help="print portals as JSON lines")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start, print URLs, wait for a signal, stop."""
    args = parse_args(argv)
    server = SandboxServer(
        port=args.port,
        tls=args.https,
        latency=args.latency,
        event_delay=args.event_delay,
        event_reorder=args.event_order == "any",
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with SandboxControl(server.url, ca_file=server.ca_file) as control:
        tweaks = {
            k: v
            for k, v in (
                ("token_ttl", args.token_ttl),
                ("operating_limit", args.operating_limit),
                ("iframe_form", args.iframe_form),
            )
            if v is not None
        }
        if tweaks:
            control.settings(**tweaks)
        print(
            f"sandbox cloud: {server.url}  (token URL {server.url}/oauth/token/, "
            f"control {server.url}/_sandbox/, "
            f"bx24.js {server.url}/bx24.js)",
            flush=True,
        )
        if server.ca_file:
            print(f"sandbox CA (B24_CA_BUNDLE): {server.ca_file}", flush=True)
        for _ in range(args.portals):
            portal = control.create_portal(
                plan=args.plan,
                app_url=args.app_url,
                client_id=args.client_id,
                client_secret=args.client_secret,
            )
            if args.json:
                print(json.dumps(portal), flush=True)
            else:
                print(
                    f"portal member_id={portal['member_id']} "
                    f"client_endpoint={portal['client_endpoint']} "
                    f"access_token={portal['access_token']} "
                    f"refresh_token={portal['refresh_token']}",
                    flush=True,
                )
            if args.install and args.app_url:
                result = control.install_app(portal["member_id"], args.app_url)
                finished = control.finish_install(portal["member_id"])
                print(
                    f"  install: HTTP {result['status']} "
                    f"install_finished={finished['install_finished']} (by the control call in "
                    "place of the installer page's BX24.installFinish())",
                    flush=True,
                )
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
