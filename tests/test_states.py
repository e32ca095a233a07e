"""``python -m adamkit.bench.states``: rounds grouped by the anchor's time, ratios paired
within each round. Checks what the tool reports, never how fast anything is."""

from __future__ import annotations

import pytest

from adamkit.bench import states as S


def test_groups_split_at_the_edges_and_ratios_are_paired_within_rounds() -> None:
    a = S.ANCHOR
    rows = [
        {a: 18.0, "int8": 24.0},  # fast: 0.75
        {a: 19.0, "int8": 19.0},  # fast: 1.0
        {a: 19.5, "int8": 39.0},  # fast: 0.5
        {a: 22.0, "int8": 22.0},  # middle: 1.0
        {a: 30.0, "int8": 20.0},  # slow: 1.5
        {a: 24.0, "int8": 48.0},  # slow (24 is the lower edge): 0.5
    ]
    groups = S.summarize(rows, edges=(20.0, 24.0))
    assert [(g["low"], g["high"], g["rounds"]) for g in groups] == [
        (0.0, 20.0, 3),
        (20.0, 24.0, 1),
        (24.0, float("inf"), 2),
    ]
    fast, middle, slow = groups
    assert fast["median_ms"] == {a: 19.0, "int8": 24.0}
    # the median of the rounds' ratios (0.75, 1.0, 0.5), not 19 / 24
    assert fast["ratio"] == {"int8": pytest.approx(0.75)}
    assert middle["ratio"] == {"int8": pytest.approx(1.0)}
    assert slow["ratio"] == {"int8": pytest.approx(1.0)}  # median of 1.5 and 0.5
    assert S.summarize(rows, edges=(10.0,))[0]["low"] == 10.0  # empty groups are left out


def test_a_short_run_steps_every_kind_every_round(capsys) -> None:
    names = [S.ANCHOR, "adamkit-compiled", "adamkit-compiled:int8"]
    rows = S.run(names, [(64,), (300,)], seconds=0.0)
    assert len(rows) == 1 and set(rows[0]) == set(names)
    assert all(ms > 0 for ms in rows[0].values())
    args = ["--seconds", "0.01", "--layout", "custom", "--params", "600", "--tensors", "2"]
    assert S.main([*args, "--state-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    assert "custom: 0.0M params in 2 tensors" in out
    assert "paired ratio adamkit-compiled " in out and "adamkit-compiled:int8 " in out


@pytest.mark.parametrize(
    "bad", [["--state-dtype", "int3"], ["--seconds", "0"], ["--seconds", "-1"]]
)
def test_bad_arguments_name_the_value(bad, capsys) -> None:
    with pytest.raises(SystemExit):
        S.main(bad)
    err = capsys.readouterr().err
    assert bad[1] in err
