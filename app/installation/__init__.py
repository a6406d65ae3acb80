"""The installation use case: installing the app into a portal and keeping it set up.

Modules, one idea each: ``views`` (``/install`` and the OAuth code flow), ``verify`` (who is
asking: the iframe POST, ``app.info``, ``user.admin``), ``install`` (the install and
uninstall of a portal), ``plan`` (the setup plan), ``setup`` (its direct executor; the
outbox one is ``upkeep``), ``user_sync`` (the extension map
from ``user.get``), ``chains`` (an admin's fresh chain), ``iframe`` (placement iframe
sessions), ``events`` (the lifecycle and user event handlers), ``blocked`` (the probe of a
REST-blocked portal), ``diagnosis`` (the read-only self-diagnosis round; its words in
``diagnosis_text``, its last report per portal in ``models``) and ``cli`` (``flask portals
resume``, ``settings``, ``check``, ``setup``).

A use case: it imports the dispatcher, the ingress registry, tenants and app/bitrix; only
the factory (app/__init__.py), workers/ and placements/ import it.
"""
