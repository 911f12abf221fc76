"""Human-readable output: key/value blocks and column tables, or JSON for scripts."""
import json


def emit(data, as_json, columns=None):
    """data: a dict (key/value block) or a list of dicts (a table over `columns`)."""
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif isinstance(data, dict):
        print(key_values(data))
    else:
        print(table(data, columns or (list(data[0]) if data else [])))


def key_values(d):
    width = max((len(k) for k in d), default=0)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in d.items())


def table(rows, columns):
    if not rows:
        return "(none)"
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
