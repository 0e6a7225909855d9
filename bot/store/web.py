"""The web gallery's sign-in links and sessions. Only hashes of their secrets are stored (the caller
hashes): a copy of the database opens nothing."""

from __future__ import annotations

import time

from sqlalchemy import bindparam, delete, insert, select, update

from bot.store.database import Database
from bot.store.records import WebLink, WebSession
from bot.store.schema import web_links, web_sessions
from bot.store.statements import values_of


class WebStore(Database):
    async def add_link(self, token_hash: str, guild_id: int, user_id: int, moderator: bool,
                       expires_at: float) -> None:
        async with self._transaction() as run:
            # Spent and stale keys go as new ones come: the tables stay as small as their use.
            await run(FORGET_LINKS, now=time.time())
            await run(FORGET_SESSIONS, now=time.time())
            await run(ADD_LINK, token_hash=token_hash, guild_id=guild_id, user_id=user_id,
                      moderator=int(moderator), expires_at=expires_at)

    async def link(self, token_hash: str) -> WebLink | None:
        rows = await self._rows(LINK, token_hash=token_hash)
        return WebLink(**dict(rows[0])) if rows else None

    async def use_link(self, token_hash: str) -> bool:
        """Spend a sign-in link: True once, while it has not expired, even for two requests at the
        same moment (one UPDATE decides)."""
        return bool(await self._rows(USE_LINK, token_hash=token_hash, now=time.time()))

    async def add_session(self, session: WebSession) -> None:
        await self._rows(ADD_SESSION, **vars(session))

    async def session(self, token_hash: str) -> WebSession | None:
        rows = await self._rows(SESSION, token_hash=token_hash, now=time.time())
        return WebSession(**dict(rows[0])) if rows else None

    async def end_session(self, token_hash: str) -> None:
        await self._rows(END_SESSION, token_hash=token_hash)


_link = web_links.c.token_hash == bindparam("token_hash")
ADD_LINK = insert(web_links).values(values_of("token_hash", "guild_id", "user_id", "moderator", "expires_at"))
USE_LINK = (update(web_links)
            .where(_link, web_links.c.used_at.is_(None), web_links.c.expires_at > bindparam("now"))
            .values(used_at=bindparam("now"))
            .returning(web_links.c.token_hash))
LINK = select(web_links).where(_link)
# A link is kept a day past its end, so that a late click still hears "expired", not "unknown".
FORGET_LINKS = delete(web_links).where(web_links.c.expires_at < bindparam("now") - 86400)
FORGET_SESSIONS = delete(web_sessions).where(web_sessions.c.expires_at < bindparam("now"))
_session = web_sessions.c.token_hash == bindparam("token_hash")
ADD_SESSION = insert(web_sessions).values(
    values_of("token_hash", "guild_id", "user_id", "moderator", "csrf", "expires_at"))
SESSION = select(web_sessions).where(_session, web_sessions.c.expires_at > bindparam("now"))
END_SESSION = delete(web_sessions).where(_session)
