"""`python -m bot check` and `python -m bot backup`: what an admin runs, with the exit codes they see."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot import preflight
from bot.__main__ import main
from bot.artifacts import job_files
from bot.config import Settings
from bot.store import NewJob, Store, migrate, only_bot_on
from engine import weights
from engine.models import required_files
from tests.botrunner import TOKEN
from tests.conftest import new_database
from tests.postgres import Postgres

ROOT = Path(__file__).resolve().parents[1]


def admin_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The settings of a small working install, as environment variables."""
    return {"DISCORD_TOKEN": TOKEN, "ENGINE_PRESET": "tiny", "ENGINE_DEVICE": "cpu",
            "DATABASE_PATH": str(tmp_path / "data" / "bot.sqlite3"), "OUTPUT_DIR": str(tmp_path / "outputs"),
            "WEIGHTS_DIR": str(tmp_path / "weights"), **overrides}


def settings_for(tmp_path: Path, **overrides: str) -> Settings:
    env = admin_env(tmp_path, **overrides)
    return Settings(_env_file=None, **{key.lower(): value for key, value in env.items()})


def assert_no_token(text: str, token: str = TOKEN) -> None:
    assert token not in text
    assert not any(len(part) > 4 and part in text for part in token.split("."))


def test_check_passes_in_a_subprocess_without_printing_the_token(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bot", "check"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), **admin_env(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "OK    token", "WARN  weights", "WARN  device", "OK    memory", "OK    database", "OK    outputs",
        "ready"]
    assert "random test models" in lines[1] and "CPU" in lines[2]
    assert "DEFAULT_SIZE 384x384 needs about" in lines[3]
    assert "does not exist yet" in lines[4]
    assert_no_token(done.stdout + done.stderr)


async def test_check_reports_a_migrated_database_and_changes_nothing(tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    store = await Store.open(tmp_path / "data" / "bot.sqlite3")
    await store.close()
    for key, value in admin_env(tmp_path, RETENTION_DAYS="30", OUTPUT_MAX_GB="2.5").items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no .env from the repository

    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert f"OK    database: {tmp_path / 'data' / 'bot.sqlite3'}: writable, schema revision " \
           f"{migrate.HEAD} (the latest)" in out
    assert "files kept 30 days, at most 2.5 GB" in out
    assert not (tmp_path / "outputs").exists()  # a check creates nothing


def test_check_fails_with_one_line_per_problem_and_exit_1(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bot.sqlite3").mkdir()  # a folder where the database file should be
    (tmp_path / "not-a-folder").write_text("")
    bad_token = "Bot " + TOKEN
    env = admin_env(tmp_path, DISCORD_TOKEN=bad_token, ENGINE_PRESET="vqgan-f16-16384",
                    DOWNLOAD_WEIGHTS="false", ENGINE_DEVICE="gpu",
                    OUTPUT_DIR=str(tmp_path / "not-a-folder" / "outputs"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)

    assert main(["check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line[:4] for line in lines[:6]] == ["FAIL"] * 3 + ["WARN"] + ["FAIL"] * 2
    assert "starts with 'Bot '" in lines[0]
    assert "3 file(s) missing and DOWNLOAD_WEIGHTS=false" in lines[1]
    assert str(tmp_path / "weights" / "vqgan_imagenet_f16_16384.ckpt") in lines[1]
    assert "'gpu' is not a device" in lines[2]
    assert "memory: not checked" in lines[3]
    assert "unable to open database file" in lines[4]
    assert "not-a-folder is not writable: Not a directory" in lines[5]
    assert lines[6] == "not ready: token, weights, device, database, outputs failed"
    assert_no_token("\n".join(lines), bad_token)


def test_check_without_a_token_reports_it_instead_of_stopping(tmp_path: Path, monkeypatch, capsys) -> None:
    for key, value in admin_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DISCORD_TOKEN")
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL  token: DISCORD_TOKEN is not set")
    assert "OK    outputs" in out  # the other checks still ran


@pytest.mark.parametrize(("token", "why"), [
    ("MTAxMDEwMTAxMDEwMTAxMDEw.GhIjKl", "it has 2 part(s)"),
    ("0123456789abcdef0123456789abcdef", "it has 1 part(s)"),  # the client secret's shape
    ("MTAx MDEw.GhIjKl.abcdefabcdef", "three base64url parts"),
    ("c2VjcmV0.GhIjKl.abcdefabcdef", "does not encode a user id"),
])
def test_malformed_tokens_fail_without_being_shown(tmp_path: Path, token: str, why: str) -> None:
    check = preflight.check_token(settings_for(tmp_path, DISCORD_TOKEN=token))
    assert check.status == "fail" and why in check.detail
    assert_no_token(check.line(), token)


def test_a_default_size_too_big_for_the_memory_fails_the_check(tmp_path: Path) -> None:
    fits = preflight.check_memory(settings_for(tmp_path, DEFAULT_SIZE="256x256"))
    assert fits.status == "ok" and "DEFAULT_SIZE 256x256 needs about" in fits.detail
    too_big = preflight.check_memory(settings_for(tmp_path, DEFAULT_SIZE="512x512", ENGINE_MEMORY_GIB="3"))
    assert too_big.status == "fail"
    assert "of the 3.0 GiB the engine may use" in too_big.detail
    assert too_big.detail.endswith("lower DEFAULT_SIZE, or raise ENGINE_MEMORY_GIB")


def test_weights_present_or_downloadable(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, ENGINE_PRESET="vqgan-f16-16384")
    downloadable = preflight.check_weights(settings)
    assert downloadable.status == "warn"
    assert "3 file(s) missing" in downloadable.detail and "huggingface.co" in downloadable.detail

    for file in required_files("vqgan-f16-16384"):
        path = weights.resolve_path(file, settings.weights_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
    assert preflight.check_weights(settings).status == "ok"
    assert preflight.check_weights(settings_for(tmp_path, ENGINE_PRESET="huge")).status == "fail"


@pytest.mark.parametrize(("revision", "status", "says"), [
    (None, "warn", f"a first release's schema version 1 of {migrate.HEAD}; the bot upgrades it"),
    ("0001", "warn", f"schema revision 0001 of {migrate.HEAD}"),
    ("9999", "fail", "has schema revision 9999, newer than this bot knows"),
])
def test_database_schema_older_or_newer_than_the_bot(tmp_path: Path, revision: str | None, status: str,
                                                     says: str) -> None:
    path = tmp_path / "data" / "bot.sqlite3"
    path.parent.mkdir()
    if revision is None:  # made by a first release, which numbered its own scripts
        with sqlite3.connect(path) as db:
            db.executescript(migrate.LEGACY[0])
            db.execute("PRAGMA user_version = 1")
    else:
        migrate.upgrade(path)
        with sqlite3.connect(path) as db:
            db.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    before = migrate.revision_of(path)
    check = preflight.check_database(settings_for(tmp_path))
    assert (check.status, says in check.detail) == (status, True), check
    assert migrate.revision_of(path) == before  # not migrated by the check


async def test_backup_command_copies_the_live_database_and_the_copy_restores(tmp_path: Path) -> None:
    live = tmp_path / "data" / "bot.sqlite3"
    store = await Store.open(live)  # stays open, as under a running bot
    for user in (1, 2):
        await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=user, total_steps=3),
                            max_per_user=5, max_queue_length=5)
    await store.claim_next_job()
    target = tmp_path / "backups" / "2024-05-01.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_PATH": str(live)}
    done = subprocess.run([sys.executable, "-m", "bot", "backup", str(target)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"backed up {live} to {target}")
    await store.enqueue(NewJob(request_json="{}", channel_id=5, user_id=3, total_steps=3),
                        max_per_user=5, max_queue_length=5)  # after the backup: not in it
    await store.close()

    # Restore as deploy/README.md says: stop the bot, put the copy in place of the database, start.
    for leftover in live.parent.glob("bot.sqlite3*"):
        leftover.unlink()
    live.write_bytes(target.read_bytes())
    restored = await Store.open(live)
    assert [(j.user_id, j.status) for j in await restored.active_jobs()] == [(1, "running"), (2, "queued")]
    await restored.close()


def test_backup_refuses_to_overwrite_or_to_copy_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_PATH", str(tmp_path / "missing.sqlite3"))
    assert main(["backup", str(tmp_path / "copy.sqlite3")]) == 2
    assert "there is no database at" in capsys.readouterr().err

    sqlite3.connect(tmp_path / "bot.sqlite3").close()
    monkeypatch.setenv("DATABASE_PATH", str(tmp_path / "bot.sqlite3"))
    (tmp_path / "copy.sqlite3").write_text("an older backup")
    assert main(["backup", str(tmp_path / "copy.sqlite3")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "copy.sqlite3").read_text() == "an older backup"


def test_the_live_check_is_quick_because_it_loads_neither_torch_nor_discord(tmp_path: Path) -> None:
    """The container's health check runs it every 30 s; importing torch there costs seconds of CPU."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "bot", "check", "--live"],
                            env={**os.environ, **admin_env(tmp_path)}, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert result.returncode == 1 and "FAIL  live: no health file" in result.stdout
    assert "bot.health" in imported and not {"torch", "discord", "engine.models"} & imported


def test_on_postgresql_the_admin_commands_say_what_they_do(tmp_path: Path, postgres: Postgres, monkeypatch,
                                                           capsys) -> None:
    """check, log and backup with DATABASE_URL; and a server that can't be reached stops the start
    with one clear line. The URL's password is never printed."""
    async def made() -> None:
        async with new_database(postgres) as url:
            # A % in the password, percent-encoded as it must be (Alembic's config reads % specially).
            with_password = url.replace(f"{postgres.user}@", f"{postgres.user}:hunter2%25pw@")
            for key, value in admin_env(tmp_path, DATABASE_URL=with_password, ENGINE="off").items():
                monkeypatch.setenv(key, value)
            assert await asyncio.to_thread(main, ["check"]) == 0
            lines = capsys.readouterr().out.splitlines()
            # A bot without an engine needs no weights nor GPU: one line says so instead.
            assert [line.split(":")[0] for line in lines] == ["OK    token", "OK    engine", "OK    database",
                                                              "OK    outputs", "ready"]
            line = lines[2]
            assert line.startswith("OK    database: postgresql://") and "no tables yet" in line, line
            assert "hunter2" not in line and ":***@" in line
            monkeypatch.delenv("ENGINE")

            store = await Store.open(with_password)  # migrated through Alembic, % and all
            asked = NewJob(request_json=json.dumps({"prompt": "a lighthouse"}), channel_id=5, user_id=1,
                           guild_id=7, total_steps=3)
            await store.enqueue(asked, max_per_user=5, max_queue_length=5)
            await store.close()
            assert await asyncio.to_thread(main, ["log", "--guild", "7", "--format", "jsonl"]) == 0
            (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert row["prompt"] == "a lighthouse" and row["status"] == "queued"
            assert await asyncio.to_thread(main, ["check"]) in (0, 1)
            assert f"schema revision {migrate.HEAD} (the latest)" in capsys.readouterr().out
            assert await asyncio.to_thread(main, ["backup", str(tmp_path / "copy")]) == 2
            assert "pg_dump" in capsys.readouterr().err and not (tmp_path / "copy").exists()

    asyncio.run(made())
    monkeypatch.setenv("DATABASE_URL", f"postgresql://{postgres.user}:hunter2@pw@127.0.0.1:1/nothing")
    assert main(["check"]) == 2  # an @ not encoded: refused by name, the URL not quoted
    error = capsys.readouterr().err
    assert "invalid setting DATABASE_URL: Value error, has an @ in the password" in error
    assert "hunter2" not in error
    unreachable = f"postgresql://{postgres.user}:hunter2-pw@127.0.0.1:1/nothing"
    done = subprocess.run([sys.executable, "-m", "bot"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT),
                               **admin_env(tmp_path, DATABASE_URL=unreachable)})
    assert done.returncode == 2
    assert "error: cannot use the PostgreSQL database (DATABASE_URL): " in done.stderr, done.stderr
    assert "hunter2-pw" not in done.stdout + done.stderr


def test_workers_and_a_bot_without_an_engine_need_the_shared_postgresql_queue(tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    for key, value in admin_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert main(["worker"]) == 2
    assert "an engine worker shares the queue through PostgreSQL: set DATABASE_URL" in capsys.readouterr().err
    monkeypatch.setenv("ENGINE", "off")  # the bot's: workers read the same .env, and run an engine anyway
    monkeypatch.setenv("DATABASE_URL", "postgresql://bot@127.0.0.1:1/bot")
    assert main(["worker"]) == 2  # past the checks: the server is not there
    assert "cannot use the PostgreSQL database (DATABASE_URL)" in capsys.readouterr().err
    monkeypatch.delenv("DATABASE_URL")
    assert main([]) == 2  # the bot itself: nothing would run its queue
    assert "ENGINE=off leaves the queue to engine workers, which share it through PostgreSQL" in \
        capsys.readouterr().err
    monkeypatch.setenv("DATABASE_URL", "mysql://bot@db/bot")
    assert main(["worker"]) == 2
    assert "invalid setting DATABASE_URL: Value error, must start with postgresql://" in \
        capsys.readouterr().err
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("ENGINE", "on")
    monkeypatch.setenv("SHARD_COUNT", "2")
    monkeypatch.setenv("SHARD_IDS", "[1]")  # the other shard in another process: it needs the shared database
    assert main([]) == 2
    assert "SHARD_IDS=[1] runs some of the 2 shards here and the rest in other processes" in \
        capsys.readouterr().err
    check = preflight.check_database(Settings(_env_file=None))  # `check` says so too
    assert check.status == "fail" and check.detail.startswith("SHARD_IDS=[1] runs some of the 2 shards")
    monkeypatch.setenv("SHARD_IDS", "[2]")
    assert main([]) == 2
    assert "invalid settings: Value error, SHARD_IDS [2]: shards are numbered 0 to 1" in \
        capsys.readouterr().err


async def test_a_sqlite_database_copies_into_an_empty_postgresql_one_whole(tmp_path: Path, postgres: Postgres,
                                                                          monkeypatch, capsys) -> None:
    """An admin growing past one GPU keeps the queue, limits, blocks, settings and both logs, and the
    files still on disk (into the database, where workers reach them); new jobs continue the numbering;
    a database with rows already is refused; a running bot is refused."""
    sqlite_path = tmp_path / "data" / "bot.sqlite3"
    old = await Store.open(sqlite_path)
    for user in (1, 2, 3):
        await old.enqueue(NewJob(request_json=json.dumps({"prompt": f"p{user}"}), channel_id=5, user_id=user,
                                 guild_id=7, total_steps=3), max_per_user=5, max_queue_length=5)
    done = await old.claim_next_job("me")
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "job-1.png").write_bytes(b"the picture")  # its state is gone already (removed by hand)
    # Paths as a default install keeps them: relative to the folder the bot ran in (not this one).
    await old.finish(done, "done", output_path="outputs/job-1.png", latent_path="outputs/job-1.state.pt")
    await old.set_guild_limit(7, "max_steps", 50, actor_id=9, old_shown="1000", new_shown="50")
    await old.block(7, 3, "spam", actor_id=9)
    await old.update_member_defaults(7, 2, {"steps": 5})
    before = [await old.get(n) for n in (1, 2, 3)]
    await old.close()

    async with new_database(postgres) as url:
        for key, value in admin_env(tmp_path, DATABASE_URL=url).items():
            monkeypatch.setenv(key, value)
        with only_bot_on(sqlite_path):  # the bot still runs on the file
            assert await asyncio.to_thread(main, ["copy-to-postgresql"]) == 2
        assert "another bot (process" in capsys.readouterr().err
        assert await asyncio.to_thread(main, ["copy-to-postgresql"]) == 0
        shown = capsys.readouterr().out
        assert "3 jobs" in shown and "1 job files," in shown and "1 job files not found" in shown
        new = await Store.open(url)
        assert await new.artifact_names("") == ["job-1.png"]
        assert await job_files(new, tmp_path / "elsewhere").read(before[0].output_path) == b"the picture"
        assert [await new.get(n) for n in (1, 2, 3)] == before
        assert await new.guild_limits(7) == {"max_steps": 50}
        assert await new.member_defaults(7, 2) == {"steps": 5}
        assert (await new.block_of(7, 3)).reason == "spam"
        assert [e.action for e in (await new.audit_entries(7, 10))[0]] == ["block", "limit set"]
        after = await new.enqueue(NewJob(request_json="{}", channel_id=5, user_id=4, guild_id=7,
                                         total_steps=3), max_per_user=5, max_queue_length=5)
        assert after.id == 4  # the numbering goes on
        await new.close()
        assert await asyncio.to_thread(main, ["copy-to-postgresql"]) == 2
        assert "already has rows in" in capsys.readouterr().err


def test_check_says_whether_the_web_gallery_can_listen_and_where_links_point(tmp_path: Path) -> None:
    base = {"_env_file": None, "engine_preset": "tiny", "database_path": tmp_path / "bot.sqlite3"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = preflight.check_web(Settings(**base, web_enabled=True, web_port=port))
        assert busy.status == "fail" and f"can't listen on 127.0.0.1:{port}" in busy.detail
    plain = preflight.check_web(Settings(**base, web_enabled=True, web_port=0))
    assert plain.status == "warn" and "set PUBLIC_URL" in plain.detail
    http = preflight.check_web(Settings(**base, web_enabled=True, web_port=0, public_url="http://gallery.example"))
    assert http.status == "warn" and "is not https" in http.detail
    good = preflight.check_web(Settings(**base, web_enabled=True, web_port=0, public_url="https://gallery.example/"))
    assert good.status == "ok" and "members open https://gallery.example" in good.detail
    elsewhere = preflight.run_checks(Settings(**base, public_url="https://gallery.example"))
    assert elsewhere[-1].name == "web" and "served by another process" in elsewhere[-1].detail
    assert all(check.name != "web" for check in preflight.run_checks(Settings(**base)))  # off: not a line
    with pytest.raises(ValidationError, match="must start with https://"):
        Settings(**base, public_url="gallery.example")
