"""Tenants, the floor: one Portal per Bitrix24 installation, keyed by member_id.

What every other package stands on, and nothing more: the models (``models``: Portal,
PortalSettings; ``users``: PortalUser), the clock (``clock``: ``utcnow``, ``aware``), the
credentials (``tokens``: the stored chain and the single-flight refresh; ``metrics``), the
status machine (``status``), the per-portal handler key (``handler_key``) and ``flask
portals`` (``cli``), and ``service``: look-ups and chain upkeep that send no REST. It
imports no service (dispatcher, ingress) and no use case; ``upkeep``, which still does,
moves to app/installation (issue 20).
"""
