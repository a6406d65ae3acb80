"""The frame protocol: the portal's parent page, and the BX24 stand-in that talks to it.

On a real portal the app's page runs in an iframe of the portal's own page, and
the BX24 library reaches the portal only through ``window.parent.postMessage``
aimed at the portal's origin (``PROTOCOL`` + ``DOMAIN``). ``installFinish`` is
one such message; the install finishes only when the portal page receives it
(protocol §2.2). So the parent page is served from the portal's own origin
(``<scheme>://<portal>/_sandbox/frame``), embeds the app page in an iframe by an
iframe POST (protocol §2.3), and finishes the install only on a
``setInstallFinish`` message from that iframe carrying the APP_SID it issued.

Wire shape (the string form of the real library's messages, our own code):
``<command>:<callback key>:<APP_SID>`` from the app frame to the portal page,
``<callback key>:<JSON>`` back. Commands: ``getInitData`` (BX24.init),
``setInstallFinish`` (BX24.installFinish) and ``resizeWindow`` (BX24.resizeWindow and
BX24.fitWindow), whose parameters ride URI-encoded JSON between the command and the key
(``resizeWindow:<params>:<key>:<APP_SID>``); the portal page sets the iframe's size, as a
portal does, and answers the size it set.
"""

from __future__ import annotations

import html
import json
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import web

from .cloud import Cloud, ControlError
from .state import Portal

FRAME_PATH = "/_sandbox/frame"
FINISH_PATH = FRAME_PATH + "/install_finish"

BX24_JS = r"""/* Sandbox stand-in for the BX24 JS library (not Bitrix code). */
(function () {
  var q = new URLSearchParams(window.location.search);
  var sid = q.get("APP_SID") || "";
  /* The real library aims every message at the portal's origin, never at "*". */
  var portal = (q.get("PROTOCOL") === "1" ? "https://" : "http://") + (q.get("DOMAIN") || "");
  var pending = {}, seq = 0, data = null, ready = [], asked = false;
  window.addEventListener("message", function (e) {
    if (e.origin !== portal || typeof e.data !== "string") return;
    var cut = e.data.indexOf(":");
    var done = pending[e.data.slice(0, cut)];
    if (cut < 0 || !done) return;
    delete pending[e.data.slice(0, cut)];
    done(e.data.length > cut + 1 ? JSON.parse(e.data.slice(cut + 1)) : null);
  });
  function send(command, done, params) {
    var key = "k" + (++seq) + Math.random().toString(36).slice(2, 10);
    pending[key] = done || function () {};
    var parts = params === undefined ? [command, key, sid]
      : [command, encodeURIComponent(JSON.stringify(params)), key, sid];
    window.parent.postMessage(parts.join(":"), portal);
  }
  function resize(width, height, cb) {
    send("resizeWindow", cb, {width: Math.ceil(width), height: Math.ceil(height)});
  }
  function init(cb) {
    if (cb) ready.push(cb);
    if (data) { ready.splice(0).forEach(function (f) { f(); }); return; }
    if (asked) return;
    asked = true;
    send("getInitData", function (d) { data = d; init(); });
  }
  window.BX24 = {
    init: init,
    getAuth: function () {
      if (!data) return false;
      return {access_token: data.AUTH_ID, refresh_token: data.REFRESH_ID,
              expires_in: data.AUTH_EXPIRES, domain: data.DOMAIN, member_id: data.MEMBER_ID};
    },
    isAdmin: function () { return !!(data && data.IS_ADMIN); },
    getDomain: function () { return data ? data.DOMAIN : q.get("DOMAIN"); },
    getLang: function () { return q.get("LANG") || "en"; },
    placement: {
      info: function () {
        return data ? {placement: data.PLACEMENT, options: data.PLACEMENT_OPTIONS} : {};
      },
      call: function (name, params, cb) { if (cb) cb({}); },
      bindEvent: function () {}
    },
    installFinish: function () { send("setInstallFinish"); },
    resizeWindow: resize,
    /* The content's size, as the real library measures it. */
    fitWindow: function (cb) {
      var d = document.documentElement;
      resize(d.scrollWidth, Math.max(d.scrollHeight, document.body.scrollHeight), cb);
    },
    getScrollSize: function () {
      return {scrollWidth: document.documentElement.scrollWidth,
              scrollHeight: document.documentElement.scrollHeight};
    },
    reloadWindow: function () { window.location.reload(); },
    closeApplication: function () {}
  };
  init();
})();
"""

PARENT_JS = r"""(function () {
  var SID = %(sid)s, APP = %(app)s, INIT = %(init)s, FINISH = %(finish)s;
  var frame = document.getElementById("app");
  function reply(key, value) {
    frame.contentWindow.postMessage(key + ":" + JSON.stringify(value), APP);
  }
  function finish(key) {
    fetch(FINISH, {method: "POST"}).then(function (r) { return r.json(); }).then(function (s) {
      reply(key, {});
      if (s.reload) window.location.reload();  /* the installer is done: the app opens */
    });
  }
  function resize(key, raw) {
    var size;
    try { size = JSON.parse(decodeURIComponent(raw)); } catch (err) { return; }
    var h = Math.max(50, Math.min(Number(size.height) || 0, 20000));
    frame.style.height = h + "px";
    frame.setAttribute("data-fitted", String(h));
    reply(key, {width: frame.clientWidth, height: h});
  }
  window.addEventListener("message", function (e) {
    /* Only our iframe, on the app's origin, with the APP_SID this page issued. */
    if (e.source !== frame.contentWindow || e.origin !== APP || typeof e.data !== "string") return;
    var parts = e.data.split(":");
    if (parts.length < 3 || parts[parts.length - 1] !== SID) return;
    var key = parts[parts.length - 2];
    if (parts[0] === "getInitData") reply(key, INIT);
    else if (parts[0] === "setInstallFinish") finish(key);
    else if (parts[0] === "resizeWindow" && parts.length === 4) resize(key, parts[1]);
  });
  document.getElementById("f").submit();
})();
"""

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Sandbox portal: {title}</title>
<link rel="icon" href="data:,">
<style>body{{margin:0}}iframe{{border:0;width:100%;height:400px;display:block}}</style></head>
<body><iframe name="app" id="app" title="{title}"></iframe>
<form id="f" method="post" target="app" action="{action}">{inputs}</form>
<script>{script}</script></body></html>"""


def bx24_js() -> web.Response:
    """The BX24 stand-in (``B24_JS_SDK_URL`` points the app at it)."""
    return web.Response(text=BX24_JS, content_type="application/javascript")


def frame_redirect(p: Portal, query: str) -> web.Response:
    """The cloud's frame URL sends the browser to the parent page on the portal's origin."""
    location = f"{p.scheme}://{p.domain}{FRAME_PATH}" + (f"?{query}" if query else "")
    return web.Response(status=302, headers={"Location": location})


async def portal_page(cloud: Cloud, p: Portal, request: web.Request) -> web.StreamResponse:
    """Requests under ``/_sandbox/`` on a portal port: the parent page and its finish call."""
    try:
        if request.path == FRAME_PATH and request.method == "GET":
            return parent_page(cloud, p, request.query)
        if request.path == FINISH_PATH and request.method == "POST":
            return web.json_response(await finish_from_frame(cloud, p, request))
    except ControlError as err:
        return web.json_response({"error": err.message}, status=err.status)
    return web.Response(status=404, text="Not found")


def _target(cloud: Cloud, p: Portal, placement: str, user_id: int) -> tuple[str, bool]:
    """The URL the iframe POST goes to, and whether it is an install (an admin's installer)."""
    if placement != "DEFAULT":
        if not p.install_finished:
            raise ControlError(409, "widgets are hidden until installation is finished")
        bound = [b for b in p.placements if b.placement == placement and b.user_id in (0, user_id)]
        if not bound:
            raise ControlError(404, f"no handler bound for {placement}")
        return bound[0].handler, False
    if p.install_finished:
        return p.app_page_url or cloud._app_url(p, "/placements/settings"), False
    url = p.install_url or cloud._app_url(p, "/install")
    return url, cloud.show_installer(p, user_id)


def parent_page(cloud: Cloud, p: Portal, query: Any) -> web.Response:
    """The portal page framing the app: iframe POST in, frame messages out."""
    placement = query.get("placement", "DEFAULT").upper()
    user_id = int(query.get("user_id") or cloud._default_user(p))
    if user_id not in p.users:
        raise ControlError(400, f"unknown user {user_id}")
    options = json.loads(query.get("options", "{}") or "{}")
    url, installing = _target(cloud, p, placement, user_id)
    target, body = cloud.frame(p, user_id, placement, options, url)
    sid = target.rsplit("APP_SID=", 1)[1]
    cloud.sessions[sid].update(install=installing, protocol=str(cloud.protocol))
    inputs = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in parse_qsl(body, keep_blank_values=True)
    )
    script = PARENT_JS % {
        "sid": _js(sid),
        "app": _js("{0.scheme}://{0.netloc}".format(urlsplit(target))),
        "init": _js(init_data(cloud.sessions[sid], sid)),
        "finish": _js(f"{FINISH_PATH}?{urlencode({'APP_SID': sid})}"),
    }
    page = PAGE.format(title=html.escape(placement), action=html.escape(target),
                       inputs=inputs, script=script)
    return web.Response(text=page, content_type="text/html")


def init_data(session: dict[str, Any], sid: str) -> dict[str, Any]:
    """What the portal page answers ``getInitData`` with (the render's user, tokens, placement)."""
    return {
        "DOMAIN": session["domain"], "PROTOCOL": session["protocol"], "LANG": session["lang"],
        "APP_SID": sid,
        "PATH": "/rest", "AUTH_ID": session["access_token"],
        "AUTH_EXPIRES": session["expires_in"], "REFRESH_ID": session["refresh_token"],
        "MEMBER_ID": session["member_id"], "IS_ADMIN": session["is_admin"],
        "INSTALL": bool(session.get("install")), "FIRST_RUN": False,
        "PLACEMENT": session["placement"], "PLACEMENT_OPTIONS": session["options"],
    }


async def finish_from_frame(cloud: Cloud, p: Portal, request: web.Request) -> dict[str, Any]:
    """The parent page got ``setInstallFinish``: finish the install its APP_SID started.

    Only the portal page itself may ask (its ``Origin``), so an app page cannot
    skip the frame protocol. Outside an installer render the call has no effect,
    as the installFinish docs page says.
    """
    if request.headers.get("Origin") != f"{p.scheme}://{p.domain}":
        raise ControlError(403, "only the portal page may finish an install")
    session = cloud.sessions.get(request.query.get("APP_SID", ""))
    if session is None or session["member_id"] != p.member_id:
        raise ControlError(404, "unknown APP_SID")
    if not session.pop("install", False):
        return {"install_finished": p.install_finished, "reload": False}
    await cloud.finish_install(p)
    return {"install_finished": p.install_finished, "reload": True}


def _js(value: Any) -> str:
    """A JSON literal safe inside a <script> element."""
    return json.dumps(value).replace("<", "\\u003c")
