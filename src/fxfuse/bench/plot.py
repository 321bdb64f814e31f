"""The benchmark plot: per op, time relative to the bandwidth floor for each variant."""

from __future__ import annotations


def plot(results: dict, path: str) -> str:
    """Draw ``results`` (``fxfuse bench --json``) into a PNG at ``path``; returns a status line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib; fxfuse bench --plot-from JSON)"
    rows = [r for r in results.get("ops", []) if r["fused"]]
    ops = sorted({r["op"] for r in rows}, key=[r["op"] for r in rows].index)
    panels = len(ops) + (1 if results.get("e2e") else 0)
    if not panels:
        return "plot skipped: no op or end-to-end results"
    cols = 3
    fig, axes = plt.subplots(-(-panels // cols), cols, figsize=(5 * cols, 3.6 * -(-panels // cols)), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        sel = [r for r in rows if r["op"] == op]
        labels = [f"{r['tokens']}x{r['width']}" for r in sel]
        x = range(len(sel))
        for key, label in (("eager_us", "eager"), ("inductor_us", "inductor"), ("fxfuse_us", "fxfuse")):
            ax.plot(x, [r["floor_us"] / r[key] * 100 for r in sel], marker="o", label=label)
        ax.axhline(100, color="gray", lw=0.8, ls="--")
        ax.set_title(op, fontsize=8)
        ax.set_xticks(list(x), labels, rotation=60, fontsize=6)
        ax.set_ylabel("% of copy bandwidth", fontsize=7)
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    if results.get("e2e"):
        ax = axes.flat[len(ops)]
        e = results["e2e"]
        ax.bar(range(len(e)), [100 * (r["speedup"] - 1) for r in e])
        ax.set_xticks(range(len(e)), [f"{r.get('quant', 'fp8')} {r['phase']} {r['seqs']}x{r['new_tokens']}" for r in e],
                      rotation=60, fontsize=6)
        ax.set_ylabel("fused vs unfused speed-up, %", fontsize=7)
        ax.set_title(f"end to end ({e[0]['layers']} layers, CUDA graphs)", fontsize=8)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(f"fxfuse bench: {results.get('device')}, torch {results.get('torch')}, triton {results.get('triton')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot written to {path}"
