"""The deployment files say what deploy/README.md promises. (Docker and systemd can't run here; this
reads the files as they would.)"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import asyncpg
import pytest
import yaml

from bot.config import Settings
from bot.store import NewJob, Store
from tests.postgres import Postgres

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SETTINGS = {name.upper() for name in Settings.model_fields}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def unit(name: str = "vqgan-clip-bot.service") -> dict[str, list[tuple[str, str]]]:
    """Sections of a systemd unit as (key, value) lists: systemd allows a key more than once."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, _, value = line.partition("=")
            sections[current].append((key, value))
    return sections


def test_compose_reserves_the_gpu_and_keeps_data_on_volumes() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    bot = compose["services"]["bot"]
    assert bot["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert (DEPLOY / bot["env_file"]).resolve() == ROOT / ".env"  # where `cp .env.example .env` puts it
    assert bot["restart"] == "unless-stopped"
    assert (DEPLOY / bot["build"]["context"] / bot["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"

    mounts = dict(volume.split(":")[::-1] for volume in bot["volumes"])
    assert mounts == {"/data": "data", "/outputs": "outputs", "/weights": "weights"}
    assert set(compose["volumes"]) == {*mounts.values(), "postgres"}  # the last: the cluster profile's
    env = bot["environment"]
    assert set(env) <= SETTINGS
    assert Path(env["DATABASE_PATH"]).parent == Path("/data")
    assert (env["OUTPUT_DIR"], env["WEIGHTS_DIR"]) == ("/outputs", "/weights")


def test_the_image_runs_unprivileged_with_volumes_and_a_preflight_healthcheck() -> None:
    steps = dockerfile()
    keywords = [keyword for keyword, _ in steps]
    args = dict(steps)  # the last of each kind
    assert steps[0][0] == "FROM" and "python:3.11" in steps[0][1]
    assert args["USER"].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert set(yaml.safe_load(args["VOLUME"])) == {"/data", "/outputs", "/weights"}
    assert args["HEALTHCHECK"].endswith('CMD ["python", "-m", "bot", "check", "--live"]')
    assert args["ENTRYPOINT"] == '["python", "-m", "bot"]'

    env = dict(pair.split("=", 1)
               for keyword, rest in steps if keyword == "ENV" for pair in shlex.split(rest))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["bot"]["environment"]
    assert {key: env[key] for key in compose} == compose  # the image alone agrees with compose
    for keyword, rest in steps:  # everything copied in exists, and nothing secret is
        if keyword == "COPY":
            *sources, _ = rest.split()
            assert all((ROOT / source).exists() and ".env" not in source for source in sources)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".venv/" in ignored


def test_the_systemd_unit_is_hardened_and_checks_before_starting() -> None:
    sections = unit()
    service = dict(sections["Service"])
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes" and service["CapabilityBoundingSet"] == ""
    assert service["User"] not in ("root", "0")
    assert service["EnvironmentFile"].startswith("/etc/")
    # Relative data paths from .env.example land in the working directory, which must be writable.
    assert service["WorkingDirectory"] in service["ReadWritePaths"].split()
    assert service["WorkingDirectory"] == f"/var/lib/{service['StateDirectory']}"
    assert service["ExecStartPre"].endswith("python -m bot check")
    assert service["ExecStart"].endswith("python -m bot")
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) >= 60
    assert "PrivateDevices" not in service  # it would hide /dev/nvidia*
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"


def test_the_cluster_profile_adds_postgresql_and_workers_and_leaves_one_box_as_it_was() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert "profiles" not in services["bot"]  # `up` without a profile: the one-box bot, SQLite
    assert services["postgres"]["profiles"] == services["worker"]["profiles"] == ["cluster"]
    assert services["postgres"]["volumes"] == ["postgres:/var/lib/postgresql/data",
                                               "./postgres-init.sh:/docker-entrypoint-initdb.d/10-bot-role.sh:ro"]
    # The bot's role is not the superuser (the image's own `postgres` is); its password is DATABASE_URL's.
    environment = services["postgres"]["environment"]
    assert environment["POSTGRES_USER"] == "postgres"
    assert environment["BOT_PASSWORD"] == "${POSTGRES_PASSWORD:-}"
    assert os.access(DEPLOY / "postgres-init.sh", os.X_OK)  # run, not sourced, by the image
    # From .env, never a default (an empty one: the image refuses to start); `:?` would break one-box
    # commands, which interpolate the whole file whatever the profile.
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-}"
    assert services["worker"]["build"] == services["bot"]["build"]
    assert services["postgres"]["ports"][0].startswith("${POSTGRES_PUBLISH:-127.0.0.1}:")  # not the LAN
    worker = services["worker"]
    assert worker["command"] == ["worker"] and worker["env_file"] == services["bot"]["env_file"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "bot", "check", "--live", "--worker"]
    assert set(worker["environment"]) <= SETTINGS
    for name in ("bot", "worker"):
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}

    per_gpu = yaml.safe_load((DEPLOY / "compose.gpus.yaml").read_text())["services"]
    assert per_gpu.pop("worker") == {"deploy": {"replicas": 0}}  # not beside the per-GPU ones
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in per_gpu.values()]
    names = [s["environment"]["WORKER_NAME"] for s in per_gpu.values()]
    assert gpus == [["0"], ["1"]] and len(set(names)) == len(names)
    assert all(s["command"] == ["worker"] and s["profiles"] == ["cluster"] for s in per_gpu.values())


def test_the_worker_unit_runs_one_worker_per_gpu_as_hardened_as_the_bot() -> None:
    bot, worker = unit(), unit("vqgan-clip-bot-worker@.service")
    service = dict(worker["Service"])
    # On the command line: bot.env (EnvironmentFile=) would override Environment= values.
    for command, ending in (("ExecStartPre", "python -m bot check"), ("ExecStart", "python -m bot worker")):
        assert service[command].startswith("/usr/bin/env CUDA_VISIBLE_DEVICES=%i WORKER_NAME=%H-gpu%i /")
        assert service[command].endswith(ending)
    different = {"ExecStart", "ExecStartPre"}
    assert [p for p in worker["Service"] if p[0] not in different] == \
        [p for p in bot["Service"] if p[0] not in different]


async def test_the_init_script_makes_a_bot_role_that_runs_the_bot_and_is_no_superuser(
        tmp_path: Path, postgres: Postgres) -> None:
    """deploy/postgres-init.sh as the postgres image runs it (psql as the superuser, PGDATA holding
    pg_hba.conf): the `bot` role migrates and runs the queue, and can't do what only a superuser can."""
    if shutil.which("psql") is None:
        pytest.skip("psql (Debian: postgresql-client) is not installed")
    admin = await asyncpg.connect(postgres.dsn())
    await admin.execute('CREATE DATABASE "bot_role_test"')
    hba = tmp_path / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all all scram-sha-256\n")
    env = {**os.environ, "POSTGRES_USER": postgres.user, "POSTGRES_DB": "bot_role_test",
           "PGDATA": str(tmp_path), "BOT_PASSWORD": "it's a 'quoted' pass", "PGHOST": "127.0.0.1",
           "PGPORT": str(postgres.port)}
    try:
        made = subprocess.run(["sh", str(DEPLOY / "postgres-init.sh")], env=env, capture_output=True,
                              text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        assert hba.read_text().splitlines() == [f"host all {postgres.user} all reject", "local all all trust",
                                                "host all all all scram-sha-256"]
        assert await admin.fetchval("SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'bot'")

        # (The test server trusts every login; the image's checks the password: scram-sha-256.)
        as_bot = postgres.url("bot_role_test").replace(f"//{postgres.user}@", "//bot@")
        store = await Store.open(as_bot)  # it makes and migrates its tables: the database is its own
        job = await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=1, total_steps=3),
                                  max_per_user=5, max_queue_length=5)
        claimed = await store.claim_next_job("gpu-1")
        assert await store.put_artifact(f"job-{job.id}.png", b"png", claimed)
        assert (await store.finish(claimed, "done", output_path=f"job-{job.id}.png")).status == "done"
        await store.close()
        connection = await asyncpg.connect(as_bot.replace("+asyncpg", ""))
        try:
            assert not await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'bot'")
            for only_a_superuser_may in ("COPY (SELECT 1) TO PROGRAM 'true'", "CREATE DATABASE another",
                                         "SELECT pg_read_file('PG_VERSION')"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await connection.execute(only_a_superuser_may)
        finally:
            await connection.close()
    finally:
        await admin.execute('DROP DATABASE IF EXISTS "bot_role_test" WITH (FORCE)')
        await admin.execute("DROP ROLE IF EXISTS bot")  # the server outlives this test
        await admin.close()
