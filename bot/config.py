"""All settings, read from the environment and `.env` (see `.env.example` for each one)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from bot.store.database import is_postgresql, postgresql_urls


class Settings(BaseSettings):
    # hide_input_in_errors: a refused DATABASE_URL or token must not be quoted back in the error.
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      hide_input_in_errors=True)

    # Discord
    discord_token: SecretStr | None = None
    discord_api_base: str = "https://discord.com/api/v10"  # a REST rate-limit proxy or test server
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    guild_ids: list[int] = Field(default_factory=list)  # sync commands here at once (else globally)
    # Where the bot answers: only these servers (empty: any server that invites it), and DMs or not.
    allowed_guilds: list[int] = Field(default_factory=list)
    allow_dms: bool = False
    # Sharding: SHARD_COUNT shards in all (unset: as many as Discord advises), and which of them this
    # process runs (SHARD_IDS=[0,1]; unset: all). Splitting them over processes needs DATABASE_URL.
    shard_count: int | None = Field(None, ge=1)
    shard_ids: list[int] | None = None

    # Storage
    database_path: Path = Path("data/bot.sqlite3")
    # A PostgreSQL server instead of the file (postgresql://user:password@host:5432/name): for engine
    # workers on several machines. A secret (it may hold a password): never logged.
    database_url: SecretStr | None = None
    output_dir: Path = Path("outputs")

    # Engine
    engine: bool = True  # ENGINE=off: no engine in this process (workers elsewhere: python -m bot worker)
    # Engine workers (with DATABASE_URL): a running job's claim lasts LEASE_S unless its worker renews
    # it; a worker that dies loses its job that long after, and another resumes it. WORKER_NAME tells
    # workers apart (a restarted worker takes its own jobs back at once): unique per worker.
    lease_s: float = Field(60.0, ge=3.0)
    worker_name: str = Field(default_factory=socket.gethostname, min_length=1)
    weights_dir: Path = Path("weights")
    engine_preset: str = "vqgan-f16-16384"
    engine_clip: str = "ViT-B-32"  # or ViT-B-16, ViT-L-14, or two joined by '+' (an ensemble)
    engine_device: str = "auto"
    engine_precision: str = "auto"
    engine_memory_gib: float = Field(0, ge=0)  # plan pictures within this much; 0 = all the device has
    clip_checkpoint: Path | None = None
    vqgan_config: Path | None = None
    vqgan_checkpoint: Path | None = None
    allow_unsafe_pickle: bool = False
    download_weights: bool = True  # fetch missing weights at start-up

    # Generation defaults and limits
    default_steps: int = Field(200, ge=1)
    max_steps: int = Field(1000, ge=1)
    default_size: str = "384x384"
    max_pixels: int = Field(512 * 512, ge=64 * 64)
    preview_every: int = Field(25, ge=1)
    max_queued_per_user: int = Field(3, ge=1)
    max_queue_length: int = Field(50, ge=1)
    cooldown_s: int = Field(0, ge=0)  # between one member's requests; 0 = none
    daily_quota: int = Field(0, ge=0)  # pictures per member per day; 0 = unlimited
    allow_init_images: bool = True
    allow_private: bool = False  # /imagine private:true (shown only to the member; moderators still see it)

    # Replies
    progress_interval_s: float = Field(2.0, ge=0.0)  # at most one progress edit this often
    token_lifetime_s: float = Field(14 * 60, gt=0)  # switch to bot-token edits after this
    preview_max_bytes: int = Field(2 * 1024 * 1024, ge=16 * 1024)

    # Retention of output files; the job rows stay, marked expired
    retention_days: int = Field(0, ge=0)  # remove files of jobs finished longer ago; 0 = keep forever
    output_max_gb: float = Field(0, ge=0)  # remove the oldest until OUTPUT_DIR is under this; 0 = no cap

    # The web gallery (bot/web): members and moderators sign in with a link from /history web or /log web
    web_enabled: bool = False
    web_host: str = "127.0.0.1"  # a reverse proxy with TLS in front (deploy/README.md) serves it to the world
    web_port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)
    public_url: str = ""  # the address members open (https://gallery.example.org); empty: http://WEB_HOST:WEB_PORT

    # Logging
    log_level: str = "INFO"
    log_file: Path | None = None  # also log to this file, rotated; empty = standard error only
    log_max_bytes: int = Field(10 * 2**20, ge=1024)  # rotate the log file at this size
    log_backups: int = Field(5, ge=0)  # rotated log files kept

    @field_validator("log_file", "database_url", "shard_count", "shard_ids", mode="before")
    @classmethod
    def _empty_means_none(cls, value: object) -> object:
        return None if value == "" else value  # `LOG_FILE=` would otherwise be the current folder

    @property
    def needs_postgresql(self) -> str | None:
        """Why this bot process can't run on the SQLite file, if it can't: other processes must share
        its queue."""
        if self.database_url is not None:
            return None
        if self.own_shards is not None:
            return (f"SHARD_IDS={self.shard_ids} runs some of the {self.shard_count} shards here and "
                    "the rest in other processes, which share the queue through PostgreSQL: set DATABASE_URL "
                    "too, or leave SHARD_IDS unset to run every shard here")
        if not self.engine:
            return ("ENGINE=off leaves the queue to engine workers, which share it through PostgreSQL: set "
                    "DATABASE_URL too, or leave ENGINE on with the SQLite file")
        return None

    @field_validator("shard_ids", mode="before")
    @classmethod
    def _comma_list_too(cls, value: object) -> object:
        if isinstance(value, str) and value.strip() and not value.strip().startswith("["):  # SHARD_IDS=0,1
            return [part.strip() for part in value.split(",")]
        return value

    @field_validator("worker_name", mode="before")
    @classmethod
    def _empty_means_this_machine(cls, value: object) -> object:
        return socket.gethostname() if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _postgresql_only(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not is_postgresql(value.get_secret_value()):
            raise ValueError("must start with postgresql:// (a SQLite file is set with DATABASE_PATH)")
        if value is not None and urlsplit(value.get_secret_value()).netloc.count("@") > 1:
            # The first @ would end the password for the driver: its rest taken for the host, and shown.
            raise ValueError("has an @ in the password: percent-encode it (%40), and : / ? # [ ] too")
        return value

    @model_validator(mode="after")
    def _shards_of_the_count(self) -> Self:
        if self.shard_ids is None:
            return self
        if self.shard_count is None:
            raise ValueError("SHARD_IDS needs SHARD_COUNT: how many shards there are in all")
        if not self.shard_ids or len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError(f"SHARD_IDS {self.shard_ids} must list each of this process's shards once")
        if not all(0 <= shard < self.shard_count for shard in self.shard_ids):
            raise ValueError(f"SHARD_IDS {self.shard_ids}: shards are numbered 0 to {self.shard_count - 1} "
                             f"with SHARD_COUNT={self.shard_count}")
        if self.own_shards is not None and "worker_name" not in self.model_fields_set:
            # Processes tell each other apart by name (who posts a result, whose jobs a restart takes
            # back): two shard processes on one machine must not share the machine's.
            self.worker_name = f"{self.worker_name}-shards-{'-'.join(map(str, self.own_shards))}"
        return self

    @property
    def own_shards(self) -> list[int] | None:
        """The shards this process runs when it runs only some (the rest run elsewhere, on the same
        database); None when it runs every shard."""
        if self.shard_ids is None or len(self.shard_ids) == self.shard_count:
            return None
        return sorted(self.shard_ids)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if not isinstance(logging.getLevelName(value.upper()), int):
            raise ValueError(f"{value!r} is not a log level; use DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @property
    def database(self) -> str | Path:
        """Where the store lives: DATABASE_URL's server, else the DATABASE_PATH file."""
        return self.database_url.get_secret_value() if self.database_url else self.database_path

    @property
    def database_shown(self) -> str:
        """The database, for logs and messages: a server's URL without its password."""
        if self.database_url is None:
            return str(self.database_path)
        return make_url(postgresql_urls(self.database_url.get_secret_value())[1]).render_as_string(
            hide_password=True)

    @property
    def database_password(self) -> str:
        """DATABASE_URL's password ("" if none), kept out of the logs like the bot token."""
        if self.database_url is None:
            return ""
        return make_url(postgresql_urls(self.database_url.get_secret_value())[1]).password or ""

    @field_validator("public_url")
    @classmethod
    def _web_address(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"must start with https:// (http:// only on one machine), got {value!r}")
        return value.rstrip("/")

    @property
    def weight_overrides(self) -> dict[str, Path]:
        paths = {"clip_checkpoint": self.clip_checkpoint, "vqgan_config": self.vqgan_config,
                 "vqgan_checkpoint": self.vqgan_checkpoint}
        return {key: path for key, path in paths.items() if path}
