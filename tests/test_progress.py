"""Progress where the output is not a terminal (a log, CI, a notebook cell): plain lines with the
count, the elapsed time and an estimate of the rest, never silence for the length of a run."""

from __future__ import annotations

import re

from pellucid.progress import _lines, track


def test_lines_when_the_output_is_not_a_terminal(capsys):
    assert list(track(range(3), "explain + evaluate")) == [0, 1, 2]
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("explain + evaluate: 3/3 done, elapsed 0:00:0")
    assert re.fullmatch(r"explain \+ evaluate: 3/3 done, elapsed \d:\d\d:\d\d, about 0:00:00 left",
                        out[-1])
    assert list(_lines(iter("abcd"), "units", 4, every=0.0)) == list("abcd")
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" done")[0] for line in lines] == [f"units: {i}/4" for i in range(1, 5)]
    assert list(track(range(3), "quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().out == ""


def test_quiet_holds_warnings_back_in_its_block_only(capsys):
    from pellucid.progress import quiet, warn

    with quiet():
        warn("about a randomised copy")
        with quiet(False):  # an inner block cannot lift an outer one
            warn("still about the copy")
    warn("about the user's model")
    assert capsys.readouterr().err == "warning: about the user's model\n"
