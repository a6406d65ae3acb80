"""Crash: SIGKILL every worker while 5,000 commands are in flight, then restart them.

    .venv/bin/python -m bench.dispatch_crash                   # 5,000 commands, 2 s a request
    .venv/bin/python -m bench.dispatch_crash --commands 1000   # quick

Two enterprise portals (K = 125 batches each, so every batch is in flight at once) at 2 s
per request; half of the commands are safe to repeat (``telephony.externalcall.register``,
which Bitrix24 dedups on EXTERNAL_CALL_ID), half are not (``crm.deal.add``). Two worker
processes start; once every command is leased (in flight) both get SIGKILL; two new ones
start. Checked from the sandbox's command log and the outbox: every command is done
exactly once, or dead as an unknown outcome where its method is unsafe (and then it ran at
most once).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

from bench.dispatch_rig import repeatable
from bench.dispatch_stack import Stack, _wait, save

SETTINGS = {"DISPATCH_REQUEST_TIMEOUT": "5", "DISPATCH_LEASE_MARGIN": "2",
            "DISPATCH_OWNER_TTL": "3", "DISPATCH_SWEEP_INTERVAL": "1"}


def workload(portal: int, n: int) -> list[tuple[str, dict[str, Any]]]:
    """Alternating register (safe) and deal.add (unsafe), each with a unique tag."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        tag = f"c{portal}-{i}"
        if i % 2:
            out.append(("crm.deal.add", {"fields": {"TITLE": tag}}))
        else:
            out.append(("telephony.externalcall.register",
                        {"USER_ID": 1, "PHONE_NUMBER": f"+4930{i:08d}", "TYPE": 2,
                         "EXTERNAL_CALL_ID": tag, "SHOW": 0}))
    return out


def tag_of(method: str, params: dict[str, Any]) -> str:
    """A command's unique tag."""
    if method == "crm.deal.add":
        return str(params["fields"]["TITLE"])
    return str(params["EXTERNAL_CALL_ID"])


def judge(stack: Stack, members: list[str]) -> dict[str, Any]:
    """Per command: how often it ran at the sandbox, and what the outbox says."""
    assert stack.sandbox is not None
    ran: Counter[str] = Counter()
    calls = 0
    for member in members:
        for e in stack.sandbox.log(member):
            if e.get("status") == 200 and e["method"] in ("crm.deal.add",
                                                          "telephony.externalcall.register"):
                ran[tag_of(e["method"], e["params"])] += 1
        found = stack.sandbox.calls(member)
        calls += len(found["active"]) + len(found["finished"])
    rows = stack.sql("SELECT method, params, status, dead_reason FROM outbox_commands")
    out: Counter[str] = Counter()
    for r in rows:
        import json

        params = json.loads(r.params) if isinstance(r.params, str) else r.params
        times = ran[tag_of(r.method, params)]
        safe = "safe" if repeatable(r.method, params) else "unsafe"
        if r.status == "done":
            out[f"{safe} done, ran once" if times == 1 else f"{safe} done, ran {times}x"] += 1
        elif r.status == "dead" and (r.dead_reason or "").startswith("unknown outcome") \
                and safe == "unsafe" and times <= 1:
            out[f"unsafe dead as unknown outcome (ran {times}x)"] += 1
        else:
            out[f"{safe} {r.status} (ran {times}x): not allowed"] += 1
    out["register calls created at the sandbox"] = calls
    return {"outcomes": out, "rows": len(rows)}


def run(args: argparse.Namespace) -> int:
    """Submit, start two workers, kill them with everything in flight, restart, judge."""
    with Stack() as stack:
        assert stack.sandbox is not None
        portals = [stack.portal(plan="enterprise", latency_ms=args.latency_ms)
                   for _ in range(2)]
        half = args.commands // 2
        for n, (portal_id, _) in enumerate(portals):
            stack.submit(portal_id, workload(n, half))
        total = 2 * half
        t0 = time.monotonic()
        stack.start_workers(2, **SETTINGS)
        def open_requests() -> int:
            assert stack.sandbox is not None
            return sum(stack.sandbox.counters(m)["in_flight"] for _, m in portals)

        # every command leased and its batch's request open at the sandbox (a batch takes
        # its rate token as it leaves, a moment after the lease), before the first comes back
        _wait(lambda: (s := stack.statuses())["done"] > 0
              or (s["inflight"] >= total * args.kill_at
                  and open_requests() >= 0.95 * s["inflight"] / 50), 120, "in flight")
        in_flight = stack.statuses()["inflight"]
        at_sandbox = open_requests()
        stack.kill_workers()
        killed_at = time.monotonic()
        stack.start_workers(2, **SETTINGS)
        end = stack.wait_settled(total, args.timeout)
        verdict = judge(stack, [m for _, m in portals])
        table = report(args, total, in_flight, at_sandbox, killed_at - t0, end - killed_at,
                       verdict)
        save("dispatch-crash", table)
        bad = sum(n for k, n in verdict["outcomes"].items()
                  if "not allowed" in k or k.startswith("unsafe done, ran") and "once" not in k)
        return 1 if bad else 0


def report(args: argparse.Namespace, total: int, in_flight: int, at_sandbox: int,
           before: float, after: float, v: dict[str, Any]) -> str:
    """The crash table."""
    lines = [
        f"Crash: {total} commands to 2 enterprise portals at {args.latency_ms / 1000:g} s a "
        "request, 2 workers SIGKILLed, 2 restarted",
        "",
        "| measure | value |",
        "|---|---|",
        f"| commands leased (in flight) at the kill | {in_flight} |",
        f"| requests open at the sandbox at the kill | {at_sandbox} |",
        f"| start to kill | {before:.1f} s |",
        f"| kill to every command settled | {after:.1f} s |",
    ]
    lines += [f"| {k} | {n} |" for k, n in sorted(v["outcomes"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options and run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commands", type=int, default=5_000)
    ap.add_argument("--latency-ms", type=float, default=2000.0)
    ap.add_argument("--kill-at", type=float, default=1.0,
                    help="kill when this share of the commands is in flight")
    ap.add_argument("--timeout", type=float, default=300.0)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
