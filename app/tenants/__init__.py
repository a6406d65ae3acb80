"""Tenants, the floor: one Portal per Bitrix24 installation, keyed by member_id.

What every other package stands on, and nothing more: the models (``models``: Portal,
PortalSettings, the clock helpers ``utcnow``/``aware``; ``users``: PortalUser), the
credentials (``tokens``: the stored chain and the single-flight refresh; ``metrics``), the
status machine (``status``), the per-portal handler key (``handler_key``) and ``flask
portals`` (``cli``). It imports no service (dispatcher, ingress) and no use case;
``service`` and ``upkeep``, which still do, are leaving (issue 20: the dispatcher's direct
path, and the setup's outbox executor in app/installation).
"""
