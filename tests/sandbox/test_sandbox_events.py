"""Acting as the portal: install POST, installFinish gating, event bodies, placements, uninstall,
offline events.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from .conftest import call

USERS_WITH_ADMIN_2 = [
    {"id": 1, "name": "A", "admin": True},
    {"id": 2, "name": "B", "admin": True},
]

DOC_BODY = (  # protocol §3.4, newlines removed
    "event=ONCRMDEALUPDATE&event_handler_id=201&data%5BFIELDS%5D%5BID%5D=759&ts=1736405807"
    "&auth%5Baccess_token%5D=s6p6eclrvim6da22ft9ch94ekreb52lv&auth%5Bexpires%5D=1736409407&auth%5Bexpires_in%5D=3600"
    "&auth%5Bscope%5D=crm%2Ctelephony%2Cplacement%2Cuser_basic&auth%5Bdomain%5D=some-domain.bitrix24.com"
    "&auth%5Bserver_endpoint%5D=https%3A%2F%2Foauth.bitrix.info%2Frest%2F&auth%5Bstatus%5D=P"
    "&auth%5Bclient_endpoint%5D=https%3A%2F%2Fsome-domain.bitrix24.com%2Frest%2F"
    "&auth%5Bmember_id%5D=a223c6b3710f85df22e9377d6c4f7553&auth%5Buser_id%5D=15"
    "&auth%5Bapplication_token%5D=51856fefc120afa4b628cc82d3935cce"
)


def installed(sandbox, fake_app, **extra):
    p = sandbox.create_portal(
        app_url=fake_app.url,
        users=[
            {"id": 1, "name": "A", "admin": True, "extension": "101"},
            {"id": 15, "name": "O", "extension": "115"},
        ],
        **extra,
    )
    result = sandbox.install_app(p["member_id"])
    assert result["install_pending"], result
    assert sandbox.finish_install(p["member_id"])["install_finished"]  # no browser runs the page
    return p


def test_install_post_shape_and_a_headless_install_stays_pending(sandbox, fake_app, http):
    p = sandbox.create_portal(app_url=fake_app.url)
    result = sandbox.install_app(p["member_id"])
    # The page calls BX24.installFinish(), but no script runs on a headless POST.
    assert "BX24.installFinish()" in result["body"]
    assert result["status"] == 200 and not result["install_finished"]
    assert result["install_pending"] and result["onappinstall"] == []
    hit = fake_app.paths("/install")[0]
    query = dict(parse_qsl(urlsplit(hit.path).query))
    assert query == {
        "DOMAIN": p["domain"],
        "PROTOCOL": "0",
        "LANG": "en",
        "APP_SID": result["app_sid"],
    }
    form = parse_qsl(hit.body.decode())
    assert [k for k, _ in form] == [
        "AUTH_ID",
        "AUTH_EXPIRES",
        "REFRESH_ID",
        "SERVER_ENDPOINT",
        "APPLICATION_TOKEN",
        "APPLICATION_SCOPE",
        "member_id",
        "status",
        "PLACEMENT",
    ]
    fields = dict(form)
    assert fields["PLACEMENT"] == "DEFAULT" and fields["SERVER_ENDPOINT"] == p["server_endpoint"]
    assert (
        fields["APPLICATION_TOKEN"] == p["application_token"]
        and fields["member_id"] == p["member_id"]
    )
    assert call(http, p, "profile", fields["AUTH_ID"]).status_code == 200
    # events wait for installFinish
    assert (
        call(
            http,
            p,
            "event.bind",
            fields["AUTH_ID"],
            event="ONCRMDEALUPDATE",
            handler=fake_app.url + "/b24/events",
        ).json()["result"]
        is True
    )
    assert (
        sandbox.trigger_event(p["member_id"], "ONCRMDEALUPDATE", {"FIELDS": {"ID": "1"}})[
            "statuses"
        ]
        == []
    )
    assert sandbox.install_state(p["member_id"])["install_finished"] is False
    # The explicit control call stands in for the page's script.
    assert sandbox.finish_install(p["member_id"])["install_finished"] is True
    assert call(http, p, "app.info").json()["result"]["INSTALLED"] is True
    assert sandbox.trigger_event(p["member_id"], "ONCRMDEALUPDATE", {"FIELDS": {"ID": "1"}})[
        "statuses"
    ] == [200]
    assert "installFinish" in http.get(sandbox.base_url + "/bx24.js").text


def test_event_body_byte_for_byte(sandbox, fake_app, http):
    p = installed(
        sandbox,
        fake_app,
        member_id="a223c6b3710f85df22e9377d6c4f7553",
        application_token="51856fefc120afa4b628cc82d3935cce",
    )
    call(http, p, "event.bind", event="onCrmDealUpdate", handler=fake_app.url + "/b24/events")
    out = sandbox.trigger_event(
        p["member_id"],
        "ONCRMDEALUPDATE",
        {"FIELDS": {"ID": 759}},
        user_id=15,
        overrides={
            "event_handler_id": 201,
            "ts": 1736405807,
            "auth": {
                "access_token": "s6p6eclrvim6da22ft9ch94ekreb52lv",
                "expires": "1736409407",
                "domain": "some-domain.bitrix24.com",
                "server_endpoint": "https://oauth.bitrix.info/rest/",
                "client_endpoint": "https://some-domain.bitrix24.com/rest/",
            },
        },
    )
    assert out["statuses"] == [200]
    hit = fake_app.paths("/b24/events")[-1]
    assert hit.body.decode() == DOC_BODY
    assert hit.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_event_body_real_values(sandbox, fake_app, http):
    p = installed(sandbox, fake_app)
    call(http, p, "event.bind", event="ONEXTERNALCALLSTART", handler=fake_app.url + "/b24/events")
    out = sandbox.trigger_event(
        p["member_id"],
        "ONEXTERNALCALLSTART",
        {
            "PHONE_NUMBER": "+494951234567",
            "PHONE_NUMBER_INTERNATIONAL": "+494951234567",
            "EXTENSION": "",
            "USER_ID": "15",
            "CALL_LIST_ID": "0",
            "LINE_NUMBER": "7",
            "IS_MOBILE": "0",
        },
        user_id=15,
    )
    body = fake_app.paths("/b24/events")[-1].body.decode()
    pairs = parse_qsl(body, keep_blank_values=True)
    keys = [k for k, _ in pairs]
    assert keys[:2] == ["event", "event_handler_id"] and keys[-1] == "auth[application_token]"
    assert "data%5BPHONE_NUMBER%5D=%2B494951234567" in body and "data%5BEXTENSION%5D=&" in body
    d = dict(pairs)
    assert d["data[CALL_ID]"] == out["data"]["CALL_ID"] and d["data[CALL_ID]"].startswith(
        "externalCall."
    )
    assert d["auth[domain]"] == p["domain"] and d["auth[client_endpoint]"] == p["client_endpoint"]
    assert d["auth[user_id]"] == "15" and "auth[refresh_token]" not in d
    assert call(http, p, "profile", d["auth[access_token]"]).json()["result"]["ID"] == "15"


def test_bind_rules(sandbox, fake_app, http):
    p = installed(sandbox, fake_app)
    ok = call(http, p, "event.bind", event="ONCRMDEALUPDATE", handler=fake_app.url + "/b24/events")
    assert ok.json()["result"] is True
    dup = call(http, p, "event.bind", event="ONCRMDEALUPDATE", handler=fake_app.url + "/b24/events")
    assert dup.json()["error"] == "ERROR_HANDLER_ALREADY_EXIST"
    assert (
        call(http, p, "event.bind", event="ONNOPE", handler=fake_app.url).json()["error"]
        == "ERROR_EVENT_NOT_FOUND"
    )
    assert (
        call(http, p, "event.bind", event="ONCRMDEALADD", handler="ftp://x.y/z").json()["error"]
        == "ERROR_UNSUPPORTED_PROTOCOL"
    )
    assert call(http, p, "event.get").json()["result"] == [
        {
            "event": "ONCRMDEALUPDATE",
            "handler": fake_app.url + "/b24/events",
            "auth_type": "0",
            "offline": 0,
        }
    ]
    gone = call(
        http, p, "event.unbind", event="ONCRMDEALUPDATE", handler=fake_app.url + "/b24/events"
    )
    assert gone.json()["result"] == {"count": 1}


def test_self_loop_and_offline_queue_latest_state(sandbox, fake_app, http):
    p = installed(sandbox, fake_app)
    call(http, p, "event.bind", event="ONCRMDEALUPDATE", event_type="offline")
    deal = sandbox.add_crm(p["member_id"], "deal", {"TITLE": "d"})
    for i in range(5):
        assert (
            call(http, p, "crm.deal.update", id=deal["ID"], fields={"TITLE": f"t{i}"}).json()[
                "result"
            ]
            is True
        )
    other = sandbox.add_crm(p["member_id"], "deal", {"TITLE": "e"})
    call(http, p, "crm.deal.update", id=other["ID"], fields={"TITLE": "x"})
    assert len(sandbox.offline_events(p["member_id"])) == 2  # one record per object
    got = call(http, p, "event.offline.get", clear=0, limit=1).json()["result"]
    assert got["process_id"] and got["events"][0]["EVENT_DATA"] == {"FIELDS": {"ID": deal["ID"]}}
    second = call(http, p, "event.offline.get", clear=0).json()["result"]
    assert [e["EVENT_DATA"]["FIELDS"]["ID"] for e in second["events"]] == [other["ID"]]  # disjoint
    assert (
        call(http, p, "event.offline.clear", process_id=got["process_id"]).json()["result"] is True
    )
    listed = call(http, p, "event.offline.list").json()
    assert listed["total"] == 1
    assert call(http, p, "event.offline.get").json()["result"] == {"process_id": None, "events": []}


def test_placements_and_uninstall(sandbox, fake_app, http):
    p = installed(sandbox, fake_app)
    assert (
        call(http, p, "placement.bind", PLACEMENT="DEFAULT", HANDLER=fake_app.url + "/x").json()[
            "error"
        ]
        == "ERROR_PLACEMENT_NOT_FOUND"
    )
    assert (
        call(
            http,
            p,
            "placement.bind",
            PLACEMENT="CALL_CARD",
            HANDLER=fake_app.url + "/placements/call_card",
            TITLE="Card",
        ).json()["result"]
        is True
    )
    assert call(http, p, "placement.get").json()["result"][0]["placement"] == "CALL_CARD"
    opened = sandbox.open_placement(
        p["member_id"], "CALL_CARD", user_id=15, options={"CALL_ID": "externalCall.x"}
    )
    assert opened["status"] == 200
    fields = dict(parse_qsl(fake_app.paths("/placements/call_card")[-1].body.decode()))
    assert (
        fields["PLACEMENT"] == "CALL_CARD"
        and fields["PLACEMENT_OPTIONS"] == '{"CALL_ID":"externalCall.x"}'
    )
    call(http, p, "event.bind", event="ONAPPUNINSTALL", handler=fake_app.url + "/b24/events")
    out = sandbox.uninstall_app(p["member_id"], clean=True)
    assert out["statuses"] == [200]
    body = dict(parse_qsl(fake_app.paths("/b24/events")[-1].body.decode()))
    assert body["data[CLEAN]"] == "1" and "auth[access_token]" not in body
    assert sorted(k for k in body if k.startswith("auth[")) == sorted(
        f"auth[{k}]"
        for k in ("domain", "server_endpoint", "client_endpoint", "member_id", "application_token")
    )
    assert sandbox.bindings(p["member_id"]) == {"events": [], "placements": []}
    assert call(http, p, "profile").json()["error"] == "NOT_INSTALLED"


def test_onappinstall_carries_refresh_token(sandbox, fake_app):
    p = sandbox.create_portal(app_url=fake_app.url)
    result = sandbox.install_app(p["member_id"], send_onappinstall=True)
    assert [d["status"] for d in result["onappinstall"]] == [200]
    body = dict(parse_qsl(fake_app.paths("/b24/events")[-1].body.decode()))
    assert (
        body["event"] == "ONAPPINSTALL"
        and body["auth[refresh_token]"]
        and body["data[INSTALLED]"] == "Y"
    )


def test_failed_handler_status_is_reported(sandbox, fake_app, http):
    p = installed(sandbox, fake_app)
    call(http, p, "event.bind", event="ONCRMLEADADD", handler=fake_app.url + "/b24/events")
    fake_app.status = 500
    assert sandbox.trigger_event(p["member_id"], "ONCRMLEADADD", {"FIELDS": {"ID": "1"}})[
        "statuses"
    ] == [500]
    assert sandbox.counters(p["member_id"])["events_failed"] == 1


SHORT_FORM = ["AUTH_ID", "AUTH_EXPIRES", "REFRESH_ID", "member_id", "status", "PLACEMENT"]


def test_short_iframe_form_per_portal_and_as_the_cloud_default(sandbox, fake_app):
    p = sandbox.create_portal(app_url=fake_app.url, iframe_form="short")
    assert p["iframe_form"] == "short"
    sandbox.install_app(p["member_id"])
    assert [k for k, _ in parse_qsl(fake_app.paths("/install")[-1].body.decode())] == SHORT_FORM
    opened = sandbox.open_placement(p["member_id"], handler=fake_app.url + "/placements/x")
    assert [k for k, _ in parse_qsl(opened["form"])] == SHORT_FORM

    assert sandbox.settings(iframe_form="short")["iframe_form"] == "short"
    q = sandbox.create_portal(app_url=fake_app.url)
    assert q["iframe_form"] == "short"
    sandbox.install_app(q["member_id"])
    assert [k for k, _ in parse_qsl(fake_app.paths("/install")[-1].body.decode())] == SHORT_FORM
    full = sandbox.create_portal(app_url=fake_app.url, iframe_form="full")
    sandbox.install_app(full["member_id"])
    assert "APPLICATION_TOKEN" in dict(parse_qsl(fake_app.paths("/install")[-1].body.decode()))


def test_unknown_iframe_form_is_refused(sandbox, http):
    bad = http.post(f"{sandbox.base_url}/_sandbox/portals", json={"iframe_form": "medium"})
    assert bad.status_code == 400 and "iframe_form" in bad.json()["error"]
    bad = http.post(f"{sandbox.base_url}/_sandbox/settings", json={"iframe_form": "medium"})
    assert bad.status_code == 400 and sandbox.settings()["iframe_form"] == "full"


def _bind_onappinstall(http, p, fake_app, token=None):
    url = fake_app.url + "/b24/events"
    assert call(http, p, "event.bind", token, event="ONAPPINSTALL", handler=url).json()["result"]


def test_install_finish_sends_onappinstall_to_what_is_bound_then(sandbox, fake_app, http):
    p = sandbox.create_portal(app_url=fake_app.url, users=USERS_WITH_ADMIN_2)
    _bind_onappinstall(http, p, fake_app)  # an earlier install's binding
    fake_app.install_html = "<html>the installer, not finished yet</html>"
    result = sandbox.install_app(p["member_id"], user_id=2)
    assert result["onappinstall"] == []
    assert sandbox.bindings(p["member_id"])["events"] == []  # the install dropped it
    installer = dict(parse_qsl(fake_app.paths("/install")[-1].body.decode()))
    _bind_onappinstall(http, p, fake_app, installer["AUTH_ID"])  # what the installer does
    assert not fake_app.paths("/b24/events")

    finished = sandbox.finish_install(p["member_id"])
    assert finished["install_finished"] is True
    [delivery] = finished["onappinstall"]
    assert delivery["status"] == 200
    body = dict(parse_qsl(fake_app.paths("/b24/events")[-1].body.decode()))
    assert body["event"] == "ONAPPINSTALL" and body["data[INSTALLED]"] == "Y"
    assert body["auth[application_token]"] == p["application_token"]
    assert body["auth[user_id]"] == "2"  # the installing admin
    assert delivery["tokens"] == {"access_token": body["auth[access_token]"],
                                  "refresh_token": body["auth[refresh_token]"]}
    # A new chain, not the installer form's; it works and can be refreshed.
    assert body["auth[refresh_token]"] != installer["REFRESH_ID"]
    assert call(http, p, "profile", body["auth[access_token]"]).json()["result"]["ID"] == "2"
    # installFinish again sends nothing more.
    assert sandbox.finish_install(p["member_id"])["onappinstall"] == []
    assert len(fake_app.paths("/b24/events")) == 1


def test_an_install_and_an_update_drop_onappinstall_bindings(sandbox, fake_app, http):
    p = sandbox.create_portal(app_url=fake_app.url)
    _bind_onappinstall(http, p, fake_app)
    sandbox.install_app(p["member_id"])
    first = sandbox.finish_install(p["member_id"])  # in place of the page's installFinish
    assert first["install_finished"] and first["onappinstall"] == []  # dropped before the page
    _bind_onappinstall(http, p, fake_app)
    call(http, p, "event.bind", event="ONAPPUPDATE", handler=fake_app.url + "/b24/events")
    sandbox.trigger_event(p["member_id"], "ONAPPUPDATE", {"VERSION": "2"})
    assert {b["event"] for b in sandbox.bindings(p["member_id"])["events"]} == {"ONAPPUPDATE"}


def test_install_after_uninstall_gets_a_new_application_token(sandbox, fake_app):
    p = installed(sandbox, fake_app)
    again = sandbox.install_app(p["member_id"])
    assert again["application_token"] == p["application_token"]  # same installation
    sandbox.uninstall_app(p["member_id"])
    fresh = sandbox.install_app(p["member_id"])
    assert fresh["install_pending"] and fresh["application_token"] != p["application_token"]
    form = dict(parse_qsl(fake_app.paths("/install")[-1].body.decode()))
    assert form["APPLICATION_TOKEN"] == fresh["application_token"]


def test_an_employee_neither_sees_nor_removes_the_apps_handlers(sandbox, fake_app, http):
    p = installed(sandbox, fake_app)
    handler = fake_app.url + "/b24/events?k=only-the-app-knows"
    assert call(http, p, "event.bind", event="ONCRMDEALUPDATE", handler=handler).json()["result"]
    bob = sandbox.issue_tokens(p["member_id"], user_id=15)["access_token"]
    assert call(http, p, "event.get", bob).json()["result"] == []
    # his own handler is bound as him, whatever auth_type he asks for
    mine = fake_app.url + "/b24/events?mine"
    assert call(http, p, "event.bind", bob, event="ONCRMDEALUPDATE", handler=mine,
                auth_type=0).json()["result"] is True
    seen = call(http, p, "event.get", bob).json()["result"]
    assert [(h["handler"], h["auth_type"]) for h in seen] == [(mine, "15")]
    gone = call(http, p, "event.unbind", bob, event="ONCRMDEALUPDATE", handler=handler)
    assert gone.json()["result"] == {"count": 0}
    admin = call(http, p, "event.get").json()["result"]
    assert {(h["handler"], h["auth_type"]) for h in admin} == {(handler, "0"), (mine, "15")}
