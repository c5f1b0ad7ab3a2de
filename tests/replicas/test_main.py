"""`adaptivellm serve --replicas N`'s own flags: bad values are usage errors before any replica
or Ray instance starts."""

from __future__ import annotations

import pytest

from adaptivellm.replicas.main import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "0"], "--replicas must be >= 1"),
        (["--replicas", "2", "--replica-urls", "http://a:1"], "but 1 --replica-urls"),
        (["--replicas", "2", "--router-target-backlog", "0"], "--router-target-backlog"),
        (["--replicas", "2", "--router-queue-limit", "-1"], "--router-queue-limit"),
        (["--replicas", "2", "--replica-poll-s", "0"], "--replica-poll-s"),
        (["--replicas", "2", "--replica-poll-s", "nan"], "--replica-poll-s"),
        (["--replicas", "2", "--replica-unhealthy-after", "0"], "--replica-unhealthy-after"),
    ],
)
def test_bad_router_flags_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
