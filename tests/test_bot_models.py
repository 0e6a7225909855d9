"""Members pick among the VQGANs installed on the bot; each picture is painted by the one it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import weights
from tests.botrunner import BotRunner, bot_settings, recipe_of, wait_for_reply
from tests.fakediscord import FakeDiscord
from tests.lightning_files import vqgan_config, write_vqgan_files

pytestmark = pytest.mark.timeout(180)


async def test_imagine_offers_the_installed_models_and_paints_with_the_one_picked(fake: FakeDiscord,
                                                                                 tmp_path: Path) -> None:
    # The Gumbel preset's files, in the formats its users download, under the names the preset knows.
    weights_dir = tmp_path / "weights"
    name = Path(weights.VQGAN_GUMBEL_F8_8192_CHECKPOINT.filename).stem
    write_vqgan_files(weights_dir, name, vqgan_config("gumbel", [1, 1, 1, 1]))
    settings = bot_settings(fake, tmp_path, weights_dir=weights_dir)
    async with BotRunner(settings):
        offered = await fake.send_autocomplete("imagine", {"prompt": "a dog", "model": ""}, "model")
        await fake.wait_for_response(offered)
        assert [c["value"] for c in offered.response_data["choices"]] == ["tiny", "gumbel-f8-8192"]

        unknown = await fake.send_slash_command("imagine", {"prompt": "a dog", "model": "coco"})
        await fake.wait_for_response(unknown)
        assert unknown.response_type == 4 and unknown.response_data["flags"] & 64
        assert "Model: 'coco' is not installed on this bot; pick one of tiny, gumbel-f8-8192." in \
            unknown.response_data["content"]

        picked = await fake.send_slash_command("imagine", {"prompt": "a dog", "model": "gumbel-f8-8192"})
        painted = recipe_of((await wait_for_reply(fake, picked, "✅", timeout=120)).attachment_bytes(0))
        default = await fake.send_slash_command("imagine", {"prompt": "a dog"})
        plain = recipe_of((await wait_for_reply(fake, default, "✅", timeout=120)).attachment_bytes(0))

    assert painted["preset"] == "gumbel-f8-8192"
    assert painted["models"]["vqgan"] == f"{name}:{name}.ckpt"
    assert painted["request"]["model"] == "gumbel-f8-8192"
    assert plain["preset"] == "tiny" and plain["request"]["model"] == "tiny"
