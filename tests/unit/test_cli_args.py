"""Command-line arguments refused before anything starts (no socket is opened)."""

from __future__ import annotations

import pytest

from glue.cli import main


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("inf", "at most 86400"),
        ("1e9", "at most 86400"),
        ("0", "more than 0"),
        ("-1", "more than 0"),
        ("nan", "more than 0"),
        ("soon", "not a number"),
    ],
)
def test_glue_pub_refuses_an_expiry_publish_would_refuse(
    value: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["pub", "--expiry", value, "some/topic", "hello"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--expiry" in error
    assert reason in error
