"""Bearer tokens for the routes that expose other users' data (the log list, metrics)."""
import hmac

from flask import jsonify, request


def require_token(*tokens, names):
    """Return an error response unless the request carries one of `tokens`; None when it does."""
    tokens = [t for t in tokens if t]
    if not tokens:
        response = jsonify(error={"type": "forbidden", "message": f"set {names} on the server to use this route"})
        return response, 403
    given = request.headers.get("Authorization", "")
    given = given[7:].strip() if given[:7].lower() == "bearer " else ""
    # Constant time, so the answer's timing says nothing about how much of a guess was right.
    if not any(hmac.compare_digest(given.encode(), token.encode()) for token in tokens):
        response = jsonify(error={"type": "unauthorized", "message": "send Authorization: Bearer <token>"})
        return response, 401, {"WWW-Authenticate": 'Bearer realm="relay"'}
    return None
