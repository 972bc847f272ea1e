"""The station's HTTP API (FastAPI, served by uvicorn inside the daemon) and its API tokens.

``create_app(ctx)`` builds the app, ``serve_api(app, host, port)`` serves it; tokens live in
the ledger database (``TokenStore``). Endpoints, roles and examples: ``docs/api.md``.
"""

from factoryd.api.app import create_app
from factoryd.api.context import ApiContext, UploadLimits
from factoryd.api.server import serve_api
from factoryd.api.tokens import Role, TokenInfo, TokenStore

__all__ = ["ApiContext", "Role", "TokenInfo", "TokenStore", "UploadLimits", "create_app", "serve_api"]
