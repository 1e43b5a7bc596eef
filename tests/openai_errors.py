"""Assertions on OpenAI-shaped error bodies, shared by the HTTP tests."""

from __future__ import annotations


def assert_openai_error(body: object) -> dict:
    """{"error": {"message": str, "type": str, "param": str | None, "code": str | None}};
    returns the inner error."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    return err


def assert_error(r, status: int, param: str | None, code: str | None = None,
                 type: str = "invalid_request_error") -> dict:
    """`r` is an OpenAI-shaped error with exactly this status, type, param and code."""
    assert r.status_code == status, r.text
    err = assert_openai_error(r.json())
    assert (err["type"], err["param"], err["code"]) == (type, param, code), err
    return err
