"""Progress in a log: a line at the start, about every 10%, and at the end."""
import io

from moed.progress import LogProgress, progress


def test_a_thousand_updates_are_a_dozen_lines():
    lines, now = [], [0.0]
    bar = LogProgress(1024 * 4096, "packing experts", clock=lambda: now[0],
                      emit=lambda fmt, *a: lines.append(fmt % a))
    for _ in range(1024):                  # one update per expert, as the packer does
        now[0] += 0.01
        bar.update(4096)
    bar.close()
    bar.close()                            # once only
    assert lines[0] == "packing experts: started (4.0 MiB)"
    assert lines[-1].startswith("packing experts: done, 4.0 MiB in 10.2 s")
    marks = lines[1:-1]
    assert len(marks) == 9, lines
    assert [int(m.split(": ")[1].split("%")[0]) for m in marks] == list(range(10, 100, 10))
    assert all("/s" in m and "s left" in m for m in marks)


def test_a_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    assert isinstance(progress(10, "x", stream=io.StringIO()), LogProgress)
    bar = progress(10, "x", stream=Terminal())
    assert not isinstance(bar, LogProgress)
    bar.close()
