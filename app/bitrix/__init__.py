"""The Bitrix24 client: a small library that knows nothing of Flask or the database.

Public surface: ``RestClient`` (``call``, ``batch``), its async twin ``AsyncRestClient``
(``call``, ``batch``, ``aclose``), ``BatchResult``,
``OAuthClient`` (``refresh``, ``exchange_code``, ``app_info``), ``TokenSet``,
``token_url_for``, ``php_query`` and the exception tree in ``errors``.
"""

from app.bitrix import errors
from app.bitrix.aio import AsyncRestClient
from app.bitrix.errors import (
    AccessDenied,
    AnswerTimeout,
    ApiError,
    BitrixError,
    InvalidGrant,
    InvalidToken,
    NotInstalled,
    OperationTimeLimit,
    PaymentRequired,
    PortalDeleted,
    PortalMoved,
    QueryLimitExceeded,
    TokenExpired,
    TransportError,
)
from app.bitrix.oauth import OAuthClient, TokenSet, token_url_for
from app.bitrix.query import command, php_query
from app.bitrix.rest import MAX_BATCH, BatchResult, RestClient

__all__ = [
    "AccessDenied", "AnswerTimeout", "ApiError", "AsyncRestClient", "BatchResult",
    "BitrixError", "InvalidGrant", "InvalidToken",
    "MAX_BATCH", "NotInstalled", "OAuthClient", "OperationTimeLimit", "PaymentRequired",
    "PortalDeleted", "PortalMoved", "QueryLimitExceeded", "RestClient", "TokenExpired",
    "TokenSet", "TransportError", "command", "errors", "php_query", "token_url_for",
]
