"""Clerk's Backend API read endpoints under ``/v1``, answered from the mirror."""

from api.blueprint import create_api_blueprint

__all__ = ["create_api_blueprint"]
