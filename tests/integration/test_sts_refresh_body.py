"""STS-66: a policy body changed without a new id is invisible until the proactive refresh (or
expiry) fetches it; real DNS, HTTPS and SQLite parts, time from an injected clock."""

from __future__ import annotations

from tests.integration.test_sts_service import DAY, DOMAIN, T0, World, mode_of, policy_text


async def test_sts_66_same_id_new_body_is_picked_up_at_refresh_not_before(sts_world: World) -> None:
    world = sts_world
    world.txt("v=STSv1; id=A")
    world.serve(policy_text(mode="testing", max_age=2 * 86400))
    sts = world.service()
    assert mode_of(await sts.get_policy(DOMAIN)) == "testing"
    world.serve(policy_text(mode="enforce", max_age=2 * 86400))  # the owner forgot to change the id
    world.clock.now = T0 + 3600
    result = await sts.get_policy(DOMAIN)
    assert (result.source, mode_of(result)) == ("cache", "testing") and world.fetches == 1
    world.clock.now = T0 + DAY
    [refreshed] = await sts.refresh_once(world.clock.now)
    assert refreshed.source == "fetched" and world.fetches == 2
    result = await sts.get_policy(DOMAIN)
    assert (mode_of(result), result.txt_id) == ("enforce", "A")
