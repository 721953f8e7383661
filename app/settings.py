"""All settings, from flags or OPTSERVE_* environment variables (the README lists them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STORE = "sqlite:///./optserve-data/optserve.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    store: str = Field(
        DEFAULT_STORE,
        description="sqlite:///path, memory://, redis://host:port/db or redis+cluster://host:port",
    )
    api_keys: str | None = Field(None, description="comma-separated bearer keys; unset = open mode")
    api_keys_file: Path | None = Field(None, description="file with one key per line")
    max_body_bytes: int = Field(1 << 30, description="largest request body accepted (413 above)")
    max_json_bytes: int = Field(
        64 << 20,
        description="largest JSON request body (413 above); large tensors go as safetensors, which a "
        "create accepts too",
    )
    parse_workers: int = Field(
        1,
        ge=1,
        description="worker processes that parse and render large JSON (and long safetensors headers) "
        "off the event loop, started when first needed",
    )
    max_inflight_bytes: int = Field(
        2 << 30, description="bytes all request bodies being received may hold together (503 above)"
    )
    body_timeout: float = Field(60.0, description="seconds a request body may take to arrive (408 after)")
    max_session_bytes: int = Field(
        4 << 30, description="bytes one session's parameters and optimizer state may take (422 above)"
    )
    max_sessions_per_key: int = Field(1_000, description="sessions one API key may hold (429 above)")
    max_bytes_per_key: int = Field(
        16 << 30, description="bytes of parameters and state one API key's sessions may hold (429 above)"
    )
    idle_trim_seconds: float = Field(
        2.0, gt=0, description="idle seconds after which memory freed since is given back to the system"
    )
    max_round_bytes: int = Field(
        2 << 30,
        description="bytes of gradients the waiting contributions to synchronous rounds may hold (503 above)",
    )
    cors_origins: str | None = Field(
        None,
        description="comma-separated origins whose pages may call the API (`*`: any); unset = none",
    )
    ui: bool = Field(True, description="serve the dashboard at /ui/ (0: no dashboard)")
    session_ttl: float | None = Field(None, description="seconds of idleness after which a session expires")
    cache_bytes: int = Field(1 << 30, description="memory for live sessions cached over a durable store")
    history_limit: int = Field(10_000, description="history rows kept per session")

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    def key_list(self) -> list[str]:
        """Every configured API key (env list and file), blank lines and `#` comments ignored."""
        keys = [k.strip() for k in (self.api_keys or "").split(",") if k.strip()]
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys
