from moed.engine.stops import StopChecker


def feed_all(checker, deltas):
    out, hit = "", False
    for i, d in enumerate(deltas):
        text, hit = checker.feed(d, final=i == len(deltas) - 1)
        out += text
        if hit:
            break
    return out, hit


def test_stop_string_split_across_deltas_is_cut():
    out, hit = feed_all(StopChecker(["END"]), ["hello E", "N", "D more"])
    assert (out, hit) == ("hello ", True)


def test_partial_prefix_is_held_then_released():
    c = StopChecker(["END"])
    assert c.feed("abcE") == ("abc", False)        # "E" could start "END"
    assert c.feed("x") == ("Ex", False)


def test_earliest_of_several_stops_wins():
    out, hit = feed_all(StopChecker(["zz", "b"]), ["aazzab"])
    assert (out, hit) == ("aa", True)


def test_no_stops_passes_through_and_final_flushes():
    assert feed_all(StopChecker([]), ["a", "b"]) == ("ab", False)
    assert feed_all(StopChecker(["xyz"]), ["ax", "xy"]) == ("axxy", False)
