"""Keys to the web gallery: sign-in links that /log web and /history web hand out, and the sessions
they open.

A link is `PUBLIC_URL/signin/<nonce>.<signature>`: the nonce is random, the signature an HMAC over the
nonce, the server, the member, their role and the expiry, with a key derived from the bot's token (every
gateway process of one bot has it; the link itself carries no token). The database keeps only the
nonce's hash, with whose link it is; the link works once, for LINK_LIFETIME_S. Opening it signs in;
a link preview or prefetch (by its User-Agent or Sec-Fetch headers) gets a page with a Sign in button
instead and spends nothing. The bot also sends the link without a preview.

A session is a random cookie (HttpOnly, SameSite=Lax, Secure behind https), kept as a hash with the
member, the server, the role and a CSRF token for its forms, for SESSION_LIFETIME_S.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from bot.config import Settings
from bot.store import Store, WebLink, WebSession

LINK_LIFETIME_S = 600
SESSION_LIFETIME_S = 8 * 3600


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _signature(settings: Settings, nonce: str, guild_id: int, user_id: int, moderator: int,
               expires_at: float) -> str:
    token = settings.discord_token.get_secret_value() if settings.discord_token else ""
    key = hashlib.sha256(b"vqgan-clip-bot web sign-in\0" + token.encode()).digest()
    message = f"{nonce}|{guild_id}|{user_id}|{moderator}|{int(expires_at)}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


async def new_link(store: Store, settings: Settings, base_url: str, guild_id: int, user_id: int,
                   moderator: bool, lifetime_s: int = LINK_LIFETIME_S) -> str:
    nonce = secrets.token_urlsafe(24)
    expires_at = float(int(time.time()) + lifetime_s)
    await store.add_link(hash_secret(nonce), guild_id, user_id, moderator, expires_at)
    signature = _signature(settings, nonce, guild_id, user_id, int(moderator), expires_at)
    return f"{base_url}/signin/{nonce}.{signature}"


async def find_link(store: Store, settings: Settings, token: str) -> WebLink | None:
    """The link this token is, if it is one of ours with a good signature (spent or not)."""
    nonce, _, signature = token.partition(".")
    if not nonce or not signature or len(token) > 200:
        return None
    link = await store.link(hash_secret(nonce))
    if link is None:
        return None
    expected = _signature(settings, nonce, link.guild_id, link.user_id, link.moderator, link.expires_at)
    return link if hmac.compare_digest(expected.encode(), signature.encode()) else None


def why_not(link: WebLink | None) -> str | None:
    """Why this link can't sign anyone in any more, or None while it can."""
    if link is None:
        return "This sign-in link is not one of this bot's (it may be cut short: copy the whole link)."
    if link.used_at is not None:
        return "This sign-in link has been used already: each works once."
    if link.expires_at <= time.time():
        return f"This sign-in link has expired: links work for {LINK_LIFETIME_S // 60} minutes."
    return None


async def open_session(store: Store, link: WebLink) -> str:
    """A new session for the link's member; returns the cookie's value (kept only as a hash)."""
    secret = secrets.token_urlsafe(32)
    session = WebSession(token_hash=hash_secret(secret), guild_id=link.guild_id, user_id=link.user_id,
                         moderator=link.moderator, csrf=secrets.token_urlsafe(24),
                         expires_at=time.time() + SESSION_LIFETIME_S)
    await store.add_session(session)
    return secret
