"""Ingress: incoming events from Bitrix24 and the PBX."""
