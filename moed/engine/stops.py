"""Stop strings over a text stream: cut the text where the first stop string
begins, and hold back any tail that could still grow into one."""


class StopChecker:
    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""        # text not yet released (could start a stop string)

    def feed(self, delta, final=False):
        """-> (text to release now, whether a stop string was hit)."""
        text = self.pending + delta
        if not self.stops:
            self.pending = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        keep = 0 if final else self._partial_suffix(text)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def _partial_suffix(self, text):
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
