"""/imagine against hostile input: hypothesis draws every option and the prompt text, the real bot
answers through the loopback Discord, and each answer must be a queued job or one specific refusal.

    .venv/bin/python -m bench.fuzz                   # 10 000 examples
    .venv/bin/python -m bench.fuzz --examples 500

Options are drawn within what Discord itself enforces before a command reaches a bot (text lengths,
integer ranges, the size choices); everything inside that is fair: any Unicode, control characters,
weighted prompts with NaN, infinite, huge or zero weights, unknown model names, empty-looking text.
The invariants: a member gets either their job's reply or one ephemeral refusal that says what to
fix (never the generic unexpected-error answer, never "thinking…" forever); nothing else is posted;
every job the bot acknowledged is in the queue; the engine task never goes down. The test suite runs
the same harness for 300 examples (tests/test_fuzz.py). Figures: one JSON line in bench/results.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.common import RESULTS_DIR, Results, machine
from bot.limits import SIZES
from engine.request import MAX_SEED
from tests.botrunner import TOKEN, BotRunner, bot_settings
from tests.fakediscord import FakeDiscord

T = TypeVar("T")
UNEXPECTED = "Something went wrong on my side"
# Lots of jobs are accepted: the queue limits must not turn the rest into queue-full refusals.
SETTINGS = {"max_queued_per_user": 100_000, "max_queue_length": 100_000, "default_steps": 1,
            "preview_every": 1000}


def _text(max_size: int) -> st.SearchStrategy[str]:
    # Any code point a JSON string can carry (no lone surrogates), control characters included.
    return st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=max_size)


def _weighted_prompt() -> st.SearchStrategy[str]:
    weight = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.sampled_from(["0", "-0", "1e309", "-1e309", "nan", "", " ", "1:2", "abc"]))
    part = st.tuples(_text(40), weight).map(lambda p: f"{p[0]}:{p[1]}")
    return st.lists(part, min_size=1, max_size=6).map(" | ".join).filter(lambda s: 1 <= len(s) <= 1000)


def imagine_options() -> st.SearchStrategy[dict[str, Any]]:
    text = _text(1000)
    return st.fixed_dictionaries(
        {"prompt": st.one_of(text, _weighted_prompt())},
        optional={"negative": text, "style": text, "steps": st.integers(1, 10_000),
                  "size": st.one_of(st.sampled_from([choice.value for choice in SIZES]), _text(20)),
                  "seed": st.integers(0, MAX_SEED),
                  "model": st.one_of(st.sampled_from(["tiny", "vqgan-f16-16384", "TINY", " tiny"]),
                                     _text(100))})


class LiveBot:
    """The loopback Discord and the real bot on an event loop in a thread of their own, so that a
    synchronous hypothesis test can send them commands."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live bot", daemon=True)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def __enter__(self) -> LiveBot:
        self.thread.start()

        async def start() -> None:
            self.fake = FakeDiscord(token=TOKEN)
            await self.fake.start()
            self.runner = BotRunner(bot_settings(self.fake, self.directory, **SETTINGS))
            self.bot = await self.runner.start()

        self.call(start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def stop() -> None:
            await self.runner.stop()
            await self.fake.stop()

        self.call(stop(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def imagine(self, options: dict[str, Any]) -> str:
        """Send one /imagine; return "queued" or the refusal's kind. Raises on a broken invariant."""
        return self.call(self._imagine(options))

    async def _imagine(self, options: dict[str, Any]) -> str:
        fake = self.fake
        interaction = await fake.send_slash_command("imagine", options)
        await fake.wait_for_response(interaction, timeout=20)
        if interaction.response_type == 4:  # answered at once: only a refusal is
            answer = interaction.response_data
            assert answer["flags"] & 64, f"a public answer to {options!r}: {answer['content']!r}"
            return _kind(answer["content"], options)
        assert interaction.response_type == 5, interaction.response_type

        def settled() -> bool:
            original = fake.original_response(interaction)
            return bool(interaction.followup_ids) or (original is not None and not original.loading)

        await fake.wait_until(settled, 20)
        if interaction.followup_ids:  # refused after the defer: the placeholder goes, an ephemeral stays
            followup = fake.get_message(interaction.followup_ids[-1])
            assert followup.ephemeral, f"a public follow-up to {options!r}: {followup.content!r}"
            original = fake.original_response(interaction)
            assert original is None or original.deleted, "a refusal left the 'thinking…' placeholder"
            return _kind(followup.content, options)
        job = await self.bot.store.get_by_interaction(interaction.id)
        assert job is not None, f"acknowledged but not queued: {options!r}"
        return "queued"


def _kind(text: str, options: dict[str, Any]) -> str:
    """A refusal's kind, for the figures: its text up to the first value."""
    assert UNEXPECTED not in text, f"an unexpected error for {options!r}: {text!r}"
    assert len(text) > 20, f"a refusal that says nothing: {text!r}"
    return re.split(r"[:'\"\d]", text, maxsplit=1)[0].strip()[:60]


def run(examples: int, directory: Path) -> dict:
    outcomes: Counter[str] = Counter()
    began = time.monotonic()
    with LiveBot(directory) as live:

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(imagine_options())
        def one(options: dict[str, Any]) -> None:
            outcomes[live.imagine(options)] += 1

        one()
        alive, crashes = live.bot.worker.alive, live.bot.worker.crashes
        queued = live.call(live.bot.store.count_jobs())
    return {"benchmark": "fuzz", "examples": sum(outcomes.values()), "queued": outcomes["queued"],
            "jobs_in_queue": queued, "refusals": dict(outcomes.most_common()),
            "engine_alive": alive, "engine_crashes": crashes,
            "seconds": round(time.monotonic() - began, 1), "machine": machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fuzz.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        Results(None if str(args.out) == "-" else args.out).emit(run(args.examples, Path(directory)))


if __name__ == "__main__":
    main()
