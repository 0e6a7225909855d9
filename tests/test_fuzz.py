"""/imagine against 300 hostile inputs drawn by hypothesis (bench/fuzz.py runs 10 000): each gets its
job or one specific ephemeral refusal, and the engine task stays up."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz import LiveBot, imagine_options

pytestmark = pytest.mark.timeout(600)
OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBot]:
    with LiveBot(tmp_path_factory.mktemp("fuzz")) as bot:
        yield bot


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(options=imagine_options())
def test_any_imagine_gets_its_job_or_one_specific_refusal(live: LiveBot, options: dict[str, Any]) -> None:
    OUTCOMES[live.imagine(options)] += 1  # the invariants are asserted inside


def test_the_engine_survived_the_fuzzing_and_both_outcomes_occurred(live: LiveBot) -> None:
    assert OUTCOMES["queued"] > 0 and sum(OUTCOMES.values()) - OUTCOMES["queued"] > 0, OUTCOMES
    assert live.bot.worker.alive and live.bot.worker.crashes == 0
    assert live.call(live.bot.store.count_jobs()) == OUTCOMES["queued"]
    # What validation let through, the engine can run: no accepted weight overflows the loss.
    failed, _ = live.call(live.bot.store.generation_log(live.fake.guild.id, status="failed", limit=1000))
    assert not [job.error for job in failed if "loss became" in (job.error or "")]
