#!/bin/sh
# Run once by the postgres image as it makes its database (mounted in /docker-entrypoint-initdb.d).
# The bot and its workers log in as `bot`: the owner of the `bot` database (it migrates its own tables)
# and not a superuser, so a GPU machine that holds its password can read and change the bot's data but
# cannot run programs on this server, read its files or touch other databases. The superuser
# ($POSTGRES_USER) logs in only from inside the container: `docker compose exec postgres psql -U postgres`.
# Sourced or run: plain `sh`, no `exit`, no `set -u`.
set -e
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=password="$BOT_PASSWORD" --set=db="$POSTGRES_DB" <<'SQL'
CREATE ROLE bot LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'password';
ALTER DATABASE :"db" OWNER TO bot;
ALTER SCHEMA public OWNER TO bot;
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
# Network logins as the superuser are refused: pg_hba.conf's first matching line wins.
{ echo "host all $POSTGRES_USER all reject"; cat "$PGDATA/pg_hba.conf"; } > "$PGDATA/pg_hba.conf.new"
mv "$PGDATA/pg_hba.conf.new" "$PGDATA/pg_hba.conf"
