"""Tenants: one Portal per Bitrix24 installation, keyed by member_id."""
