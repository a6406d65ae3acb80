"""Faults: 20,000 commands through the dispatcher while the portal misbehaves.

    .venv/bin/python -m bench.dispatch_faults              # 20,000 commands
    .venv/bin/python -m bench.dispatch_faults --commands 2000 --plan enterprise   # quick

The default portal is a standard one (2 batches/s): the run lasts over 3 minutes, so the
30 s token expires several times.

The sandbox portal answers 5 % of requests with a JSON 500, resets 2 % of connections,
runs 1 % and then answers an HTML 504 (``executed_504``), and every access token lives
30 s (``token_ttl``). One worker process runs the dispatcher. The workload mixes methods
safe to repeat (``telephony.externalcall.register``, ``crm.contact.list``), an unsafe one
(``crm.deal.add``) and a permanent failure (``crm.deal.get`` of a missing deal).

Checked from the sandbox's command log and counters, and the outbox:
nothing lost (every command done or dead), zero ``invalid_grant`` (no refresh-token reuse,
the portal still active), duplicates only for methods safe to repeat, dead letters only
for permanent errors and unknown outcomes of unsafe methods.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

from bench.dispatch_rig import repeatable
from bench.dispatch_stack import Stack, save

FAULTS = {"http_500": 0.05, "reset": 0.02, "executed_504": 0.01}
SETTINGS = {"DISPATCH_SWEEP_INTERVAL": "1", "DISPATCH_REQUEST_TIMEOUT": "20",
            "DISPATCH_LEASE_MARGIN": "5"}
MISSING_DEAL = 987654321


def workload(n: int) -> list[tuple[str, dict[str, Any]]]:
    """40 % register, 40 % deal.add, 15 % contact.list, 5 % deal.get of a missing deal."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        slot = i % 20
        if slot < 8:
            out.append(("telephony.externalcall.register",
                        {"USER_ID": 1, "PHONE_NUMBER": f"+4930{i:08d}", "TYPE": 2,
                         "EXTERNAL_CALL_ID": f"f-{i}", "SHOW": 0}))
        elif slot < 16:
            out.append(("crm.deal.add", {"fields": {"TITLE": f"f-{i}"}}))
        elif slot < 19:
            out.append(("crm.contact.list", {"filter": {"ID": i}}))
        else:
            out.append(("crm.deal.get", {"id": MISSING_DEAL}))
    return out


def tag_of(entry: dict[str, Any]) -> str | None:
    """The command a sandbox log entry belongs to (its unique tag), if it carries one."""
    params = entry.get("params") or {}
    if entry["method"] == "crm.deal.add":
        return (params.get("fields") or {}).get("TITLE")
    if entry["method"] == "telephony.externalcall.register":
        return params.get("EXTERNAL_CALL_ID")
    return None


def judge(stack: Stack, portal_id: int, member: str, ids: list[int],
          tags: dict[int, str | None]) -> dict[str, Any]:
    """Everything the acceptance list asks, from the sandbox log and the outbox."""
    assert stack.sandbox is not None
    rows = stack.sql("SELECT id, method, params, status, dead_reason FROM outbox_commands "
                     "WHERE portal_id = :p", p=portal_id)
    ran = Counter(tag_of(e) for e in stack.sandbox.log(member) if e.get("status") == 200)
    lost = [r.id for r in rows if r.status not in ("done", "dead")] + \
        sorted(set(ids) - {r.id for r in rows})
    dup_safe: Counter[str] = Counter()
    dup_unsafe, done_not_run, bad_dead = 0, 0, []
    dead_kinds: Counter[str] = Counter()
    for r in rows:
        tag = tags.get(r.id)
        times = ran[tag] if tag else None
        if times and times > 1:
            if repeatable(r.method, _params(r.params)):
                dup_safe[r.method] += times - 1
            else:
                dup_unsafe += 1
        if r.status == "done" and tag and times == 0:
            done_not_run += 1
        if r.status == "dead":
            kind = dead_kind(r.method, _params(r.params), r.dead_reason or "")
            dead_kinds[f"{r.method}: {kind}"] += 1
            if kind == "not allowed":
                bad_dead.append((r.id, r.method, r.dead_reason))
    return {"lost": lost, "dup_safe": dup_safe, "dup_unsafe": dup_unsafe,
            "done_not_run": done_not_run, "bad_dead": bad_dead, "dead_kinds": dead_kinds,
            "statuses": Counter(r.status for r in rows)}


def _params(raw: Any) -> Any:
    import json

    return json.loads(raw) if isinstance(raw, str) else raw


def dead_kind(method: str, params: Any, reason: str) -> str:
    """Why a dead letter is allowed: a permanent error, or an unrepeatable command's unknown
    outcome; anything else is 'not allowed'."""
    if reason.startswith("unknown outcome"):
        return "unknown outcome" if not repeatable(method, params) else "not allowed"
    if method == "crm.deal.get" and "NOT_FOUND" in reason:
        return "permanent (NOT_FOUND)"
    return "not allowed"


def run(args: argparse.Namespace) -> int:
    """Submit the workload with one worker running; wait; judge; print the table."""
    with Stack(token_ttl=args.token_ttl) as stack:
        assert stack.sandbox is not None
        portal_id, member = stack.portal(plan=args.plan, latency_ms=args.latency_ms)
        for kind, rate in FAULTS.items():
            stack.sandbox.set_fault(member, kind, rate=rate)
        commands = workload(args.commands)
        stack.start_workers(1, **SETTINGS)
        t0 = time.monotonic()
        ids = stack.submit(portal_id, commands)
        tags = {i: tag_of({"method": m, "params": p})
                for i, (m, p) in zip(ids, commands, strict=True)}
        end = stack.wait_settled(len(ids), args.timeout, portal_id)
        stack.sandbox.clear_faults(member)
        verdict = judge(stack, portal_id, member, ids, tags)
        counters = stack.sandbox.counters(member)
        status = stack.sql("SELECT status FROM portals WHERE id = :p", p=portal_id)[0][0]
        table = report(args, end - t0, verdict, counters, status)
        save("dispatch-faults", table)
        ok = (not verdict["lost"] and not verdict["dup_unsafe"] and not verdict["bad_dead"]
              and not counters["violations"]["refresh_token_reuse"] and status == "active")
        return 0 if ok else 1


def report(args: argparse.Namespace, wall: float, v: dict[str, Any], c: dict[str, Any],
           portal_status: str) -> str:
    """The faults table."""
    lines = [
        f"Faults: {args.commands} commands, one {args.plan} portal at {args.latency_ms:g} ms, "
        f"faults {', '.join(f'{k} {r:.0%}' for k, r in FAULTS.items())}, "
        f"token_ttl {args.token_ttl} s, one worker",
        "",
        "| measure | value |",
        "|---|---|",
        f"| wall time (submit to last settled) | {wall:.1f} s |",
        f"| REST requests / batches executed | {c['rest_requests']} / {c['batches']} |",
        f"| faults injected (of them executed, then 504) | {c['faults_injected']} "
        f"({c['executed_504']}) |",
        f"| token refreshes | {c['refreshes']} |",
        f"| 503 answers | {c['status_503']} |",
        f"| invalid_grant (refresh-token reuse) / portal status after | "
        f"{c['violations']['refresh_token_reuse']} / {portal_status} |",
        f"| outbox: done / dead | {v['statuses']['done']} / {v['statuses']['dead']} |",
        f"| commands lost | {len(v['lost'])} |",
        f"| unsafe commands that ran twice | {v['dup_unsafe']} |",
        f"| done but never ran | {v['done_not_run']} |",
        f"| duplicates of safe methods | "
        f"{', '.join(f'{m} {n}' for m, n in v['dup_safe'].items()) or 0} |",
        f"| dead letters by method and reason | "
        f"{'; '.join(f'{k} {n}' for k, n in sorted(v['dead_kinds'].items())) or 0} |",
        f"| dead letters not allowed | {len(v['bad_dead'])} |",
    ]
    if v["bad_dead"]:
        lines += ["", "not allowed: " + repr(v["bad_dead"][:5])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options and run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commands", type=int, default=20_000)
    ap.add_argument("--plan", default="standard", choices=["standard", "enterprise"])
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--token-ttl", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=900.0)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
