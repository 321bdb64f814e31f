"""The benchmark plot: per op, time relative to the bandwidth floor for each variant, and
the end-to-end speed-ups."""

from __future__ import annotations

COLS = 3


def _op_rows(results: dict) -> list[dict]:
    """The op rows to draw: the fused ops (the point of the plot); a run of unfused ops
    only (``--ops rms_norm``) draws those instead of nothing."""
    rows = results.get("ops", [])
    return [r for r in rows if r["fused"]] or list(rows)


def _layers_label(e2e: list[dict]) -> str:
    """``"32 layers"``, or every count a run mixed (``"4, 32 layers"``)."""
    counts = sorted({r["layers"] for r in e2e})
    return f"{', '.join(map(str, counts))} layer{'s' if counts != [1] else ''}"


def figure(results: dict):
    """The matplotlib figure of ``results`` (``fxfuse bench --json``): one panel per op and
    one for the end-to-end rows, a grid of exactly those panels; None when there is
    nothing to draw. Needs matplotlib (a non-interactive backend is the caller's choice).

    Example:
        >>> fig = figure({"e2e": [dict(phase="decode", seqs=1, new_tokens=1, layers=32, speedup=1.05)]})
        >>> len(fig.axes)
        1
    """
    import matplotlib.pyplot as plt

    rows = _op_rows(results)
    ops = list(dict.fromkeys(r["op"] for r in rows))  # first-seen order
    e2e = [r for r in results.get("e2e") or [] if "speedup" in r]  # rows of both variants
    panels = len(ops) + (1 if e2e else 0)
    if not panels:
        return None
    cols = min(COLS, panels)
    nrows = -(-panels // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        fig.delaxes(ax)  # the last grid row's unused cells: no empty frames
    for ax, op in zip(axes, ops):
        _op_panel(ax, op, [r for r in rows if r["op"] == op])
    if e2e:
        _e2e_panel(axes[len(ops)], e2e)
    fig.suptitle(f"fxfuse bench: {results.get('device')}, torch {results.get('torch')}, triton {results.get('triton')}")
    fig.tight_layout()
    return fig


def _op_panel(ax, op: str, sel: list[dict]) -> None:
    labels = [f"{r['tokens']}x{r['width']}" for r in sel]
    x = range(len(sel))
    for key, label in (("eager_us", "eager"), ("inductor_us", "inductor"), ("fxfuse_us", "fxfuse")):
        ax.plot(x, [r["floor_us"] / r[key] * 100 for r in sel], marker="o", label=label)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.set_title(f"{op} (cold L2)", fontsize=8)
    ax.set_xticks(list(x), labels, rotation=60, fontsize=6)
    ax.set_ylabel("% of copy bandwidth", fontsize=7)
    ax.set_yscale("log")
    ax.legend(fontsize=6)


def _e2e_panel(ax, e2e: list[dict]) -> None:
    mixed = len({r["layers"] for r in e2e}) > 1
    # Rows from before the model families carry no "model": they are Llama-3-8B's.
    models = len({r.get("model", "llama3-8b") for r in e2e}) > 1
    ax.bar(range(len(e2e)), [100 * (r["speedup"] - 1) for r in e2e])
    ax.set_xticks(range(len(e2e)),
                  [(f"{r.get('model', 'llama3-8b')} " if models else "")
                   + f"{r.get('quant', 'fp8')} {r['phase']} {r['seqs']}x{r['new_tokens']}"
                   + (f" L{r['layers']}" if mixed else "") for r in e2e],
                  rotation=60, fontsize=6)
    ax.set_ylabel("fused vs unfused speed-up, %", fontsize=7)
    ax.set_title(f"end to end ({_layers_label(e2e)}, CUDA graphs)", fontsize=8)


def plot(results: dict, path: str) -> str:
    """Draw ``results`` (``fxfuse bench --json``) into a PNG at ``path``; returns a status line.

    Example:
        >>> plot(json.load(open("bench.json")), "bench.png")
        'plot written to bench.png'
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib; fxfuse bench --plot-from JSON)"
    fig = figure(results)
    if fig is None:
        return "plot skipped: no op or end-to-end results"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
