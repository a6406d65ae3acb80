"""Peers: the throughput workload through b24relay, fast_bitrix24 and b24pysdk.

    .venv/bin/python -m bench.dispatch_peers                    # 5,000 commands, 3 scenarios
    .venv/bin/python -m bench.dispatch_peers --commands 500 --cap 120   # quick

Bench-only dependencies: ``pip install -e '.[bench]'`` (fast-bitrix24, b24pysdk).

One sandbox portal server (https mode, since b24pysdk only speaks https) in one run; for
each scenario and client a fresh standard portal (2 batches/s, burst 50) gets 5,000
``telephony.externalcall.register`` commands, each with its own EXTERNAL_CALL_ID:
at 1 s per request; at 10 s; at 1 s with 5 % gateway errors (HTML 502) and 2 % resets.

- b24relay: ``submit`` in the bench process, one worker process running the dispatcher;
- fast_bitrix24: ``Bitrix(client_endpoint, token_func=...)`` (its OAuth-app mode: the
  token function refreshes at the portal's auth server) and ``call(method, items)``,
  which packs batches of 50 and paces them itself;
- b24pysdk: ``BitrixToken(domain, auth_token, refresh_token, bitrix_app=BitrixApp(...))``
  and ``call_batches`` (its multi-batch helper, one batch after another). Its OAuth
  refresh goes to a fixed host (oauth.bitrix24.tech), unreachable on loopback; tokens
  here live an hour, so it never needs one.

The latency is waiting, not the method's processing (``set_latency(..., operating=False)``):
100 batches of one method at 10 s of processing would pass its operating-time limit
(480 s in 10 minutes), a ceiling of its own. Each peer runs in its own process, stopped
at ``--cap`` seconds. Lost = commands that never ran at the sandbox (its command log),
whatever the client believes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

from bench.dispatch_stack import CLIENT_ID, CLIENT_SECRET, ROOT, Stack, _wait, save

CLIENTS = ("b24relay", "fast_bitrix24", "b24pysdk")
SCENARIOS = {"1 s": (1000.0, {}), "10 s": (10000.0, {}),
             "1 s + 5 % 502, 2 % resets": (1000.0, {"html_502": 0.05, "reset": 0.02})}
METHOD = "telephony.externalcall.register"


def commands(tag: str, n: int) -> list[dict[str, Any]]:
    """n register commands, each with its own EXTERNAL_CALL_ID."""
    return [{"USER_ID": 1, "PHONE_NUMBER": f"+4930{i:08d}", "TYPE": 2,
             "EXTERNAL_CALL_ID": f"{tag}-{i}", "SHOW": 0} for i in range(n)]


def ceiling_seconds(n: int, round_trip: float) -> float:
    """A standard portal's best: the burst of 50 batches, then 2 batches/s, + one trip."""
    return max(0, math.ceil(n / 50) - 50) / 2.0 + round_trip


# ---------------------------------------------------------------- peer clients (child)

def run_fast_bitrix24(cfg: dict[str, Any]) -> None:
    """fast_bitrix24 in its OAuth-app mode: a token function that refreshes."""
    import httpx
    from fast_bitrix24 import Bitrix

    state = {"refresh": cfg["refresh_token"]}

    async def token_func() -> str:
        async with httpx.AsyncClient(verify=cfg["ca_file"]) as client:
            resp = await client.get(cfg["token_url"], params={
                "grant_type": "refresh_token", "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET, "refresh_token": state["refresh"]})
        body = resp.json()
        if "refresh_token" not in body:
            raise RuntimeError(f"the auth server refused a refresh: {body}")
        state["refresh"] = body["refresh_token"]
        return str(body["access_token"])

    bitrix = Bitrix(cfg["client_endpoint"], token_func=token_func, verbose=False)
    bitrix.call(METHOD, cfg["items"])


def run_b24pysdk(cfg: dict[str, Any]) -> None:
    """b24pysdk with an OAuth application token and its multi-batch helper."""
    from b24pysdk import BitrixApp, BitrixToken, Config

    Config().configure(default_timeout=(3.05, cfg["read_timeout"]))
    token = BitrixToken(domain=cfg["domain"], auth_token=cfg["access_token"],
                        refresh_token=cfg["refresh_token"],
                        bitrix_app=BitrixApp(client_id=CLIENT_ID, client_secret=CLIENT_SECRET))
    token.call_batches({f"r{i}": (METHOD, item) for i, item in enumerate(cfg["items"])})


def child(client: str) -> None:
    """Run one peer client on the config read from stdin; print its outcome as JSON."""
    cfg = json.loads(sys.stdin.read())
    started, error = time.monotonic(), None
    try:
        {"fast_bitrix24": run_fast_bitrix24, "b24pysdk": run_b24pysdk}[client](cfg)
    except Exception as exc:  # the client gave up: report it, count what ran
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    print(json.dumps({"wall": time.monotonic() - started, "error": error}), flush=True)


# ---------------------------------------------------------------- the run (parent)

def run_peer(stack: Stack, client: str, info: dict[str, Any], items: list[dict[str, Any]],
             cap: float, latency: float) -> dict[str, Any]:
    """One peer client in its own process; its wall time (None when capped) and error."""
    cfg = {**info, "items": items, "ca_file": stack.ca_file, "read_timeout": latency + 30,
           "token_url": stack.sandbox_url + "/oauth/token/"}
    env = {**os.environ, "REQUESTS_CA_BUNDLE": stack.ca_file or "",
           "SSL_CERT_FILE": stack.ca_file or "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bench.dispatch_peers", "--child", client],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(json.dumps(cfg), timeout=cap)
        return json.loads(out.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"wall": None, "error": f"stopped at the {cap:g} s cap"}


def run_ours(stack: Stack, portal_id: int, items: list[dict[str, Any]], cap: float
             ) -> dict[str, Any]:
    """b24relay: submit everything, wait until all are done or dead."""
    started = time.monotonic()
    stack.submit(portal_id, [(METHOD, item) for item in items])
    try:
        end = stack.wait_settled(len(items), cap, portal_id)
    except RuntimeError:
        return {"wall": None, "error": f"stopped at the {cap:g} s cap"}
    return {"wall": end - started, "error": None}


def one(stack: Stack, client: str, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    """One client on one scenario, on a fresh portal."""
    assert stack.sandbox is not None
    latency_ms, faults = SCENARIOS[scenario]
    portal_id, member = stack.portal(plan="standard", latency_ms=latency_ms,
                                     latency_operating=False)
    for kind, rate in faults.items():
        stack.sandbox.set_fault(member, kind, rate=rate)
    tag = f"{client}-{portal_id}"
    items = commands(tag, args.commands)
    if client == "b24relay":
        outcome = run_ours(stack, portal_id, items, args.cap)
    else:
        outcome = run_peer(stack, client, portal_tokens(stack, portal_id), items, args.cap,
                           latency_ms / 1000)
    stack.sandbox.clear_faults(member)
    _wait(lambda: stack.sandbox.counters(member)["in_flight"] == 0, latency_ms / 1000 + 30,
          "requests a stopped client left in flight")  # they may still run: count them
    ran = {e["params"].get("EXTERNAL_CALL_ID") for e in stack.sandbox.log(member, method=METHOD)
           if e.get("status") == 200}
    counters = stack.sandbox.counters(member)
    return {"client": client, "scenario": scenario, **outcome,
            "ceiling": ceiling_seconds(args.commands, latency_ms / 1000),
            "503": counters["status_503"], "lost": args.commands - len(ran),
            "requests": counters["rest_requests"]}


def portal_tokens(stack: Stack, portal_id: int) -> dict[str, Any]:
    """The portal's endpoint and its current chain, as a peer client is configured."""
    from app.extensions import db
    from app.tenants.models import Portal

    with stack.app.app_context():
        p = db.session.get(Portal, portal_id)
        return {"client_endpoint": p.client_endpoint, "domain": p.domain,
                "access_token": p.access_token, "refresh_token": p.refresh_token}


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The peers table."""
    lines = [
        f"Peers: {args.commands} register commands to one standard portal per client and "
        f"scenario (sandbox over https, one run; cap {args.cap:g} s)",
        "",
        "| scenario | client | wall | ceiling | wall / ceiling | requests | 503s | lost | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = f"{r['wall']:.1f} s" if r["wall"] is not None else f"> {args.cap:g} s"
        ratio = f"{r['wall'] / r['ceiling']:.2f}" if r["wall"] is not None else \
            f"> {args.cap / r['ceiling']:.1f}"
        lines.append(f"| {r['scenario']} | {r['client']} | {wall} | {r['ceiling']:.1f} s | "
                     f"{ratio} | {r['requests']} | {r['503']} | {r['lost']} | "
                     f"{r['error'] or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options; run every client on every scenario (or be a child)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commands", type=int, default=5_000)
    ap.add_argument("--cap", type=float, default=240.0, help="seconds per client and scenario")
    ap.add_argument("--clients", nargs="+", default=list(CLIENTS))
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--child", choices=CLIENTS[1:])
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    rows = []
    with Stack(tls=True) as stack:
        stack.start_workers(1, DISPATCH_SWEEP_INTERVAL="1")
        for scenario in args.scenarios:
            for client in args.clients:
                rows.append(one(stack, client, scenario, args))
                print(report(args, rows[-1:]).splitlines()[-1], flush=True)
    save("dispatch-peers", report(args, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
