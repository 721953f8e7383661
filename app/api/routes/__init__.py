"""Thin FastAPI routers: parse, call the use case, shape the answer."""
