"""Every word the self-diagnosis says (app/installation/diagnosis.py), in one place.

A finding is stored as a message key and its facts, never as text: :func:`render` words it
when it is shown, so the page can later word it in the portal's language from the
Flask-Babel catalogue and an old report is worded anew. Every text is marked with
:func:`N_` (extracted by ``make translations``) and translated when it is worded, in the
language of the request (the portal's LANG) or, in a terminal, the one ``force_locale``
names. The templates use gettext's ``%(name)s`` placeholders. A fact that is a list is shown
comma-separated, a missing one as "-".

Each message is ``(summary, advice)``: what was found, and what to do about it (empty when
there is nothing to do). A text may be a tuple of sentences, each translated on its own and
joined with a space (the shared advice sentences are translated once).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask_babel import gettext

Text = str | tuple[str, ...]


def N_(text: str) -> str:  # noqa: N802 (gettext's name for a no-op marker)
    """Mark ``text`` for the catalogue; it is translated when it is worded."""
    return text

LEVELS = {"ok": N_("OK"), "warn": N_("WARNING"), "error": N_("ERROR")}

# What each check looks at, as the page and the terminal name it.
CHECKS = {
    "status": N_("portal status"),
    "token": N_("token chain"),
    "round_trip": N_("round trip"),
    "limits": N_("limits"),
    "clock": N_("clock"),
    "install": N_("installation"),
    "scopes": N_("scopes"),
    "chain_user": N_("the chain's user"),
    "events": N_("event bindings"),
    "placements": N_("widgets"),
    "lines": N_("external lines"),
    "outgoing_line": N_("default outgoing line"),
    "users_sync": N_("user sync"),
    "extensions_missing": N_("users without an extension"),
    "extensions_taken": N_("extensions claimed twice"),
    "overrides": N_("extension overrides"),
}

# What each needed scope is for (app.installation.plan.NEEDED_SCOPES names them).
SCOPE_USES = {
    "crm": N_("crm (client matching and leads of the calls)"),
    "telephony": N_("telephony (lines, calls, cards, click-to-call, the call-card widget)"),
    "placement": N_("placement (the call-card and analytics widgets)"),
    "user_basic": N_("user_basic (users and their extensions)"),
}

# Facts that hold a code, and the words for each value.
LABELS: dict[str, dict[str, str]] = {
    "mode": {"batch": N_("one batch"), "single": N_("one request per check")},
    "direction": {"ahead": N_("ahead of"), "behind": N_("behind")},
    "line_kind": {"our_line": N_("one of b24relay's lines"),
                  "our_app": N_("b24relay itself"), "app": N_("another app"),
                  "base": N_("no line chosen: the portal's base number"),
                  "sip": N_("a SIP PBX"), "rented": N_("a rented number or another line")},
    "pace_note": {"slow": N_("more slowly than Bitrix24 allows"),
                  "fast": N_("faster than Bitrix24 allows "
                             "(expect QUERY_LIMIT_EXCEEDED answers)")},
    "missing_scopes": SCOPE_USES,
    "source": {"scope": N_("the portal's scope method"),
               "token": N_("the last token answer")},
}

OPEN_AS_ADMIN = (N_("Open b24relay in Bitrix24 once as a portal administrator: the app takes "
                 "that administrator's connection."))
RERUN_SETUP = (N_("Run `flask portals setup %(member_id)s`: the app's setup runs again and binds "
               "what is missing (through the dispatcher, within a minute); then check again. If "
               "it stays missing, reinstall the app from Bitrix24 Market."))
DEFAULT_LINE_HOWTO = (
    N_("In Bitrix24 open Telephony > Telephony settings and set the default number for outgoing "
    "calls to b24relay (listed as an application) or one of its lines (b24relay's lines: "
    "%(our_lines)s). A user's own outgoing line, in that user's telephony settings, overrides "
    "the default for that user."))

MESSAGES: dict[str, tuple[Text, Text]] = {
    # The portal's status in b24relay
    "status.active": (N_("The portal is active."), ""),
    "status.installing": (
        N_("The installation has not finished yet (status installing since %(since)s)."),
        N_("Finish the installation in Bitrix24: open the app as an administrator so that its "
        "installer page completes.")),
    "status.held": (
        N_("b24relay holds every call to this portal: it is %(status)s since %(since)s. "
           "%(reason)s"),
        N_("Follow the reason given. `flask portals show %(member_id)s` shows the status; nothing "
        "is sent to Bitrix24 until it is active again.")),
    # The token chain
    "token.ok": (
        N_("The stored token chain works. Access token valid until %(expires_at)s; the refresh "
        "token is %(age_days)s days old (%(days_left)s days before it dies unused)."), ""),
    "token.missing": (
        N_("No token chain is stored for this portal."),
        (OPEN_AS_ADMIN, N_("If that does not help, reinstall the app."))),
    "token.aging": (
        N_("The refresh token is %(age_days)s days old: it dies in %(days_left)s days unless it is "
        "used."),
        N_("b24relay refreshes a quiet portal's chain after IDLE_REFRESH_DAYS; check that the "
        "workers and their hourly jobs run (`flask portals refresh %(member_id)s` refreshes it "
        "now).")),
    "token.refresh_stuck": (
        N_("A token refresh started at %(refresh_started_at)s never finished: the process that "
        "ran it stopped, and the stored refresh token may be spent."),
        (N_("Run `flask portals refresh %(member_id)s`. If Bitrix24 refuses it,"), OPEN_AS_ADMIN)),
    "token.rejected": (
        N_("Bitrix24 refused the stored token chain: %(error)s %(description)s"),
        (OPEN_AS_ADMIN, N_("If that does not help, reinstall the app."))),
    # One round trip
    "round.ok": (
        N_("The portal answered in %(ms)s ms (%(mode)s; Bitrix24 itself took %(portal_ms)s ms)."),
        ""),
    "round.slow": (
        N_("The portal answered, but slowly: %(ms)s ms (%(mode)s; Bitrix24 itself took "
        "%(portal_ms)s ms), more than %(limit_ms)s ms."),
        N_("Bitrix24 is slow right now. b24relay sends batches in parallel, so calls keep "
        "flowing; check again later, and the dashboard's round-trip chart for how long it lasts.")),
    "round.one_by_one": (
        N_("The batch of all checks failed (%(batch_error)s), so each was asked on its own; the "
        "first answer took %(ms)s ms."),
        N_("A method of the portal fails as a whole request: the findings below name which one.")),
    "round.no_answer": (
        N_("The portal gave no usable answer: %(error)s"),
        N_("Check that the portal %(domain)s is reachable from b24relay's hosts (its address may "
        "have changed, or Bitrix24 is down); then check again.")),
    "round.rate_limited": (
        N_("Bitrix24 refused the round: the portal's request budget is used up right now "
        "(QUERY_LIMIT_EXCEEDED)."),
        N_("Other work on the portal is using its requests; b24relay waits for the budget by "
        "itself. Check again in a minute.")),
    "round.refused": (
        N_("Bitrix24 refused the round: %(error)s %(description)s"),
        N_("Check again; if it stays so, tell Bitrix24 support with this error.")),
    "round.no_token": (
        N_("Nothing was read: Bitrix24 refused the app's token (%(error)s), also after a refresh."),
        N_("See the token chain above.")),
    "round.not_sent": (
        N_("Nothing was asked: b24relay holds this portal's calls (%(status)s)."),
        N_("See the portal status above.")),
    "round.failed": (
        N_("The round stopped on an unexpected error: %(error)s"),
        N_("This is a fault in b24relay: look for the error in the logs and report it.")),
    # Limits
    "limits.ok": (
        N_("%(plan)s plan (Bitrix24 says %(portal_plan)s, license %(license)s): b24relay paces "
        "%(drain)s requests/s with a burst of %(burst)s. The round cost the portal "
        "%(processing_ms)s ms of processing; operating time reported (s): %(operating)s (a "
        "batch answer reports none)."),
        ""),
    "limits.plan_differs": (
        N_("Bitrix24 says the portal has the %(portal_plan)s plan (%(license)s), but b24relay "
        "paces it as %(plan)s (%(drain)s requests/s, burst %(burst)s)."),
        N_("The app takes the plan at each setup: run `flask portals setup %(member_id)s`. "
        "Until then it paces the portal %(pace_note)s.")),
    # The clock
    "clock.ok": (
        N_("The portal's clock agrees with ours (%(skew)s s apart; portal time %(portal_time)s)."),
        ""),
    "clock.skewed": (
        N_("The portal's clock is %(skew)s s %(direction)s ours (portal time %(portal_time)s, ours "
        "%(our_time)s); more than %(limit)s s."),
        N_("Check the time of b24relay's hosts first (`timedatectl`: NTP synchronised?). If ours "
        "is right, the portal's clock is off: tell Bitrix24 support. Call times, the 30-minute "
        "register dedup and token expiry depend on both clocks.")),
    "clock.unknown": (
        N_("The portal's answer carried no time to compare with ours."), ""),
    # app.info
    "install.ok": (
        N_("Bitrix24 says the app is installed (license %(license)s, app status %(app_status)s)."),
        ""),
    "install.unfinished": (
        N_("Bitrix24 says the installation is not finished: until it is, the portal sends no "
        "events and hides the widgets."),
        N_("Open b24relay in Bitrix24 as an administrator: the installer page finishes the "
        "installation (BX24.installFinish).")),
    "install.payment": (
        N_("Bitrix24 says the app's subscription has expired (PAYMENT_EXPIRED, %(days)s days)."),
        N_("Renew the app's subscription in Bitrix24 Market.")),
    # Scopes
    "scopes.ok": (
        N_("Every scope the app needs is granted (%(granted)s)."), ""),
    "scopes.missing": (
        N_("Scopes the app needs are not granted: %(missing_scopes)s. Granted (from "
        "%(source)s): %(granted)s."),
        N_("An administrator must grant them: reinstall the app from Bitrix24 Market and accept "
        "its permissions (for a local app: add the scopes in its settings under Developer "
        "resources, then open it once).")),
    # The chain's user
    "chain_user.admin": (
        N_("The stored chain belongs to user %(user_id)s, a portal administrator."), ""),
    "chain_user.not_admin": (
        N_("The stored chain belongs to user %(user_id)s, who is not a portal administrator: the "
        "app cannot see or bind its event handlers and widgets, nor read offline events."),
        OPEN_AS_ADMIN),
    # Event bindings
    "events.ok": (
        N_("All %(count)s events are bound as the %(mode)s mode wants."), ""),
    "events.missing": (
        N_("Events not bound: %(missing)s. Bitrix24 does not send them to b24relay (click-to-call, "
        "uninstalls, new users...)."),
        RERUN_SETUP),
    "events.stale": (
        N_("Bindings b24relay no longer wants are still there: %(extra)s. Bitrix24 sends those "
        "events twice, or to an old address."),
        RERUN_SETUP),
    "events.not_admin": (
        N_("Not checked: the chain's user is no administrator, so event.get shows only that "
        "user's own handlers."),
        OPEN_AS_ADMIN),
    # Placements
    "placements.ok": (
        N_("The widgets are in place: %(bound)s."), ""),
    "placements.missing": (
        N_("Widgets not bound: %(missing)s."),
        RERUN_SETUP),
    "placements.stale": (
        N_("Widgets bound to an address b24relay no longer uses: %(extra)s."),
        RERUN_SETUP),
    # External lines
    "lines.ok": (
        N_("The settings' %(configured)s line(s) are in Bitrix24 as configured. b24relay's other "
        "lines there (made by calls on numbers the settings lack; kept): %(others)s."), ""),
    "lines.none": (
        N_("No company lines are configured, and Bitrix24 has none of b24relay's."),
        N_("Nothing is wrong. To show the company number in the call card, add the lines on the "
        "settings page.")),
    "lines.missing": (
        N_("Lines in the settings but not in Bitrix24: %(missing)s."),
        N_("Run `flask portals setup %(member_id)s`: the setup adds them (lines saved on the "
        "settings page are added the same way). If they stay missing, check the telephony "
        "scope above.")),
    "lines.differ": (
        N_("Lines whose name or lead creation differ from the settings: %(differ)s."),
        N_("Run `flask portals setup %(member_id)s`: the setup updates them.")),
    # The default outgoing line
    "outgoing.yes": (
        N_("The portal's default line for outgoing calls is b24relay's (%(line_id)s): "
           "click-to-call reaches the app."), ""),
    "outgoing.no": (
        N_("The portal's default line for outgoing calls is %(line_id)s (%(line_kind)s), not "
        "b24relay: click-to-call does not reach the app."),
        DEFAULT_LINE_HOWTO),
    "outgoing.unknown": (
        N_("Cannot tell whether b24relay is the portal's default line for outgoing calls: Bitrix24 "
        "answered %(line_id)s."),
        (N_("Check it by hand:"), DEFAULT_LINE_HOWTO)),
    # The user sync
    "users_sync.ok": (
        N_("The user list was read at %(at)s: %(users)s user(s), %(active)s active."), ""),
    "users_sync.at_install": (
        N_("The user list was read at install: %(users)s user(s), %(active)s active."), ""),
    "users_sync.never": (
        N_("The user list has never been read completely."),
        N_("Run `flask portals setup %(member_id)s` (it reads the users too), or wait for the "
        "next sync (every few hours).")),
    "users_sync.failed": (
        N_("The last user sync (%(at)s) failed: %(error)s"),
        N_("Check the portal status and scopes above, then read the users again with `flask "
        "portals setup %(member_id)s`.")),
    "users_sync.running": (
        N_("A user sync has been running since %(at)s."),
        N_("If it does not finish within minutes, check that the workers run.")),
    # Extensions
    "extensions.all_mapped": (
        N_("Every active user (%(active)s) has an extension."), ""),
    "extensions.missing": (
        N_("%(count)s active user(s) have no extension: %(users)s. Their calls get no card "
        "(the fallback user's, if set) and they cannot use click-to-call."),
        N_("In Bitrix24 give each of them an internal number (their profile's \"Internal phone\", "
        "or Telephony > Users), or add an override with `flask calls extensions set "
        "--member-id %(member_id)s EXT USER_ID`. b24relay reads the users again every few "
        "hours (`flask portals setup %(member_id)s`: now).")),
    "extensions.unique": (
        N_("No extension is claimed twice."), ""),
    "extensions.duplicate": (
        N_("Extensions claimed by more than one user: %(duplicates)s. Calls to them go to one of "
        "those users only."),
        N_("In Bitrix24 give each user their own internal number, or decide who answers with an "
        "override: `flask calls extensions set --member-id %(member_id)s EXT USER_ID`.")),
    "extensions.shadowed": (
        N_("Overrides take extensions that users hold in Bitrix24 (extension: holder -> the "
        "override's user): %(shadowed)s. The override wins; the holder gets no calls on it."),
        N_("If that is meant, nothing to do. Otherwise remove the override (`flask calls "
        "extensions unset --member-id %(member_id)s EXT`) or change the user's internal "
        "number.")),
    "overrides.ok": (
        N_("%(count)s extension override(s), all in use."), ""),
    "overrides.none": (
        N_("No extension overrides: every extension is the one Bitrix24 stores."), ""),
    "overrides.ignored": (
        N_("Overrides that are ignored, their user inactive or unknown to b24relay (extension -> "
        "user): %(ignored)s."),
        N_("Point them at an active user (`flask calls extensions set --member-id %(member_id)s "
        "EXT USER_ID`) or remove them (`flask calls extensions unset ...`).")),
    # A read that failed: the finding says which one and why
    "probe.scope": (
        N_("Not checked: Bitrix24 refused %(method)s for a missing scope (%(error)s)."),
        N_("Grant the app the scope (see scopes above), then check again.")),
    "probe.access": (
        N_("Not checked: Bitrix24 refused %(method)s for lack of rights (%(error)s: "
        "%(description)s)."),
        (OPEN_AS_ADMIN, N_("For the default outgoing line the user needs the telephony "
                           "permission to edit lines."))),
    "probe.operating": (
        N_("Not checked: Bitrix24 has paused %(method)s for the app (OPERATION_TIME_LIMIT: its "
        "operating time over 10 minutes is used up)."),
        N_("It resumes by itself within 10 minutes; check again then.")),
    "probe.not_found": (
        N_("Not checked: the portal has no method %(method)s (%(error)s)."),
        N_("The portal's telephony module may be switched off: check Telephony in Bitrix24.")),
    "probe.no_answer": (
        N_("Not checked: %(method)s got no usable answer (%(error)s)."),
        N_("Check again; if it stays so, the portal has a fault in this method: tell Bitrix24 "
        "support.")),
    "probe.error": (
        N_("Not checked: %(method)s answered %(error)s %(description)s."),
        N_("Check again; if it stays so, tell Bitrix24 support with this error.")),
    "probe.skipped": (
        N_("Not checked: the round did not reach the portal."),
        ""),
    "check.crashed": (
        N_("This check stopped on an unexpected error: %(error)s"),
        N_("This is a fault in b24relay: look for the error in the logs and report it.")),
}

# The terminal's frame around the findings (flask portals check).
HEADER = N_("b24relay self-diagnosis of %(domain)s (member_id %(member_id)s) at %(at)s, "
            "%(seconds)s s")
FOOTER = N_("%(errors)s error(s), %(warnings)s warning(s).")
ADVICE_MARK = "-> "


def _shown(value: Any, labels: Mapping[str, str] | None = None) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return gettext(N_("yes") if value else N_("no"))
    if isinstance(value, (list, tuple)):
        return ", ".join(_shown(v, labels) for v in value)
    label = (labels or {}).get(str(value))
    shown = gettext(label) if label else str(value)
    # Facts quote the portal (user names, error texts): no control character reaches a terminal.
    return "".join(ch if ch.isprintable() else "?" for ch in shown)


class _Facts(dict[str, str]):
    """Facts as text; a placeholder the facts lack shows as "-" instead of failing."""

    def __missing__(self, key: str) -> str:
        return "-"


def translated(text: Text) -> str:
    """``text`` in the current language (a tuple of sentences: each one, joined)."""
    parts = (text,) if isinstance(text, str) else text
    return " ".join(gettext(part) for part in parts if part)


def fill(template: Text, facts: Mapping[str, Any]) -> str:
    """``template``, translated, with its ``%(name)s`` placeholders taken from ``facts``."""
    return translated(template) % _Facts({k: _shown(v, LABELS.get(k)) for k, v in facts.items()})


def render(code: str, key: str, facts: Mapping[str, Any],
           portal: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(summary, advice)`` of a finding in words; ``portal``: its ``member_id`` and
    ``domain``, which advice quotes in commands."""
    summary, advice = MESSAGES.get(key, ("%(key)s", ""))
    values = {"check": translated(CHECKS.get(code, code)), "key": key, **(portal or {}),
              **facts}
    return fill(summary, values), fill(advice, values)
