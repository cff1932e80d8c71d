"""The PNG: one panel per metric, a bar per case (the median) with each repetition
as a dot and the ratio to the baseline written on the bar. matplotlib, Agg backend."""

from __future__ import annotations

import math
from typing import Any, Mapping

from udpflannel.lab.benchlib.report import METRICS, format_ratio, format_value

_COLORS = {"veth": "#9e9e9e", "kernel-vxlan": "#3b6ea5"}
_MODE_COLORS = ("#e07b39", "#c9a227", "#5aa469", "#b5485d", "#7e57c2", "#00897b")


def _color(case: str, index: int) -> str:
    return _COLORS.get(case, _MODE_COLORS[index % len(_MODE_COLORS)])


def write_png(doc: Mapping[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(doc["cases"])
    colors = {}
    for i, c in enumerate(c for c in cases if c not in _COLORS):
        colors[c] = _color(c, i)
    colors.update({c: _COLORS[c] for c in cases if c in _COLORS})

    cols = 5
    rows = math.ceil(len(METRICS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.6 * rows + 0.8), squeeze=False)
    xs = range(len(cases))
    parent = ""
    for ax, m in zip(axes.flat, METRICS):
        title = m.label.strip()
        if m.label.startswith(" "):          # a sub-row of the table, e.g. "  retransmits"
            title = f"{parent}: {title}"
        else:
            parent = title
        for x, case in zip(xs, cases):
            c = doc["cases"][case]
            med = c["median"].get(m.key)
            reps = [r["metrics"].get(m.key) for r in c["runs"]]
            if med is None:
                ax.annotate("n/a", (x, 0), textcoords="offset points", xytext=(0, 3),
                            ha="center", va="bottom", fontsize=7, color="#777777")
                continue
            ax.bar(x, med, color=colors[case], width=0.7)
            ax.scatter([x] * sum(v is not None for v in reps), [v for v in reps if v is not None],
                       s=9, color="black", zorder=3)
            ratios = c.get("ratio_to_baseline") or {}
            label = format_value(med, m.integer)
            if ratios.get(m.key) is not None and case != doc["baseline"]:
                label += f"\n{format_ratio(ratios[m.key])}"
            top = max([med] + [v for v in reps if v is not None])   # above the dots too
            ax.annotate(label, (x, top), textcoords="offset points", xytext=(0, 2),
                        ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{title} ({m.unit})" + (" ↑" if m.better == "higher" else " ↓"), fontsize=9)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([c.replace("udpflannel-", "uf-") for c in cases], rotation=30,
                           ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlim(-0.6, len(cases) - 0.4)
        ax.margins(y=0.25)
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(METRICS):]:
        ax.axis("off")
    meta = doc["meta"]
    fig.suptitle(f"udpflannel bench, {meta.get('started', '')}: median of {meta.get('repeat')} "
                 f"run(s), iperf3 {meta.get('iperf_seconds')} s each; ↑/↓ = higher/lower is better; "
                 f"ratio = value / {doc['baseline']}; uf- = udpflannel-", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
