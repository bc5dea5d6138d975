"""matplotlib figures (Agg backend, PNG): PPL against ratio, kept ranks per layer and matrix,
zero-shot accuracy against ratio. Each function returns the written path, or None when the runs
hold nothing to plot."""
from __future__ import annotations

import re
from pathlib import Path

from .runs import group_labels

MATRIX_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _methods(records):
    return sorted({r["method"] for r in records if r["method"] != "dense"})


def _series(records, group, method, value, error=None):
    """(ratios, values, errors) of one method in one model group, by ratio; None values dropped."""
    points = sorted((r["ratio"], value(r), (error(r) if error else None) or 0.0) for r in records
                    if r["group"] == group and r["method"] == method and r.get("ratio") is not None
                    and value(r) is not None)
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def _dense_value(records, group, value):
    values = [value(r) for r in records if r["group"] == group and r["method"] == "dense" and value(r) is not None]
    return values[0] if values else None


def _save(plt, fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _grid(plt, rows, cols, w=3.6, h=3.0):
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    return fig, axes


def _plain_log_ticks(ax) -> None:
    """Label a log axis 20, 30, 50 rather than 2×10¹; minor ticks too when it spans under ~1.5 decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high / max(low, 1e-9) < 30 else NullFormatter())
    ax.tick_params(axis="y", which="both", labelsize=8)


def plot_ppl_vs_ratio(records: list[dict], out: Path) -> Path | None:
    """One panel per (model, dataset): PPL (log scale) against target ratio, one line per method;
    the dense model as a dashed line."""
    panels = [(g, d) for g in dict.fromkeys(r["group"] for r in records)
              for d in dict.fromkeys(k for r in records if r["group"] == g for k in r["ppl"])]
    if not panels:
        return None
    plt, labels = _plt(), group_labels(records)
    fig, axes = _grid(plt, 1, len(panels), 4.2, 3.4)
    methods = _methods(records)
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (group, dataset) in zip(axes[0], panels):
        value = lambda r, d=dataset: r["ppl"].get(d)  # noqa: E731
        dense = _dense_value(records, group, value)
        for method in methods:
            xs, ys, _ = _series(records, group, method, value)
            if xs:
                if dense is not None:
                    xs, ys = [0.0] + xs, [dense] + ys
                ax.plot(xs, ys, marker="o", color=colors[method], label=method)
        if dense is not None:
            ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label=f"dense {dense:.2f}")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_xlabel("ratio (decoder-linear parameters removed)", fontsize=9)
        ax.set_ylabel(f"{dataset} perplexity")
        ax.set_title(labels[group], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, out)


def layer_and_matrix(name: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.down_proj' -> (3, 'down_proj'); None for a name outside the decoder layers."""
    match = re.search(r"layers\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2).rsplit(".", 1)[-1]) if match else None


def rank_grid(record: dict):
    """(layers, matrices, ranks, fractions): ranks[i][j] is the kept rank of matrix j in layer i (None:
    left dense, "" : absent); fractions[i][j] = kept rank / full rank min(out, in), 1.0 where dense,
    NaN where unknown."""
    import numpy as np
    cells = {}
    for name, rank in (record.get("ranks") or {}).items():
        key = layer_and_matrix(name)
        if key is None:
            continue
        shape = (record.get("shapes") or {}).get(name)
        cells[key] = (rank, 1.0 if rank is None else (rank / min(shape) if shape else np.nan))
    layers = sorted({k[0] for k in cells})
    present = {k[1] for k in cells}
    matrices = [m for m in MATRIX_ORDER if m in present] + sorted(present - set(MATRIX_ORDER))
    ranks = [["" for _ in matrices] for _ in layers]
    fractions = np.full((len(layers), len(matrices)), np.nan)
    for (layer, matrix), (rank, frac) in cells.items():
        i, j = layers.index(layer), matrices.index(matrix)
        ranks[i][j], fractions[i, j] = rank, frac
    return layers, matrices, ranks, fractions


def plot_rank_heatmap(record: dict, out: Path) -> Path | None:
    """Layers down, matrices across; colour = kept rank / full rank (min(out, in)), text = kept rank.
    Matrices the allocation left dense (rank None) are 1.0 and marked 'full'."""
    layers, matrices, ranks, fractions = rank_grid(record)
    if not layers:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(matrices), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(fractions, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    for i in range(len(layers)):
        for j in range(len(matrices)):
            frac, rank = fractions[i, j], ranks[i][j]
            ax.text(j, i, "full" if rank is None else str(rank), ha="center", va="center", fontsize=6,
                    color="black" if frac == frac and frac > 0.6 else "white")
    ax.set_xticks(range(len(matrices)), matrices, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_ylabel("decoder layer")
    ax.set_title(f"{record['name']}: kept rank ({record['method']} @ {record.get('ratio')})", fontsize=9)
    fig.colorbar(image, ax=ax, label="kept rank / full rank")
    return _save(plt, fig, out)


def plot_zeroshot_vs_ratio(records: list[dict], out: Path, metric: str = "acc") -> Path | None:
    """Rows = models, columns = tasks plus their mean: accuracy (± stderr) against ratio, one line per
    method; the dense model as a dashed line."""
    from ..evaluation.zeroshot import mean_accuracy
    with_zs = [r for r in records if r.get("zeroshot")]
    if not with_zs:
        return None
    groups = list(dict.fromkeys(r["group"] for r in with_zs))
    tasks = list(dict.fromkeys(t for r in with_zs for t in r["zeroshot"]["tasks"]))
    columns = tasks + (["mean"] if len(tasks) > 1 else [])
    plt, labels = _plt(), group_labels(records)
    fig, axes = _grid(plt, len(groups), len(columns), 2.7, 2.5)
    methods = _methods(with_zs)
    colors = {m: f"C{i}" for i, m in enumerate(methods)}

    def getter(task, what):
        def value(r):
            zs = (r.get("zeroshot") or {}).get("tasks") or {}
            if task == "mean":
                return mean_accuracy(zs, metric) if what == "value" and zs else None
            t = zs.get(task) or {}
            name = metric if metric in t else "acc"  # WinoGrande: acc only
            return t.get(name) if what == "value" else t.get(f"{name}_stderr")
        return value

    for row, group in enumerate(groups):
        for col, task in enumerate(columns):
            ax = axes[row][col]
            value, stderr = getter(task, "value"), getter(task, "stderr")
            dense = _dense_value(with_zs, group, value)
            for method in methods:
                xs, ys, errs = _series(with_zs, group, method, value, stderr)
                if not xs:
                    continue
                if dense is not None:
                    xs, ys, errs = [0.0] + xs, [dense] + ys, [_dense_value(with_zs, group, stderr) or 0.0] + errs
                ax.errorbar(xs, ys, yerr=errs, marker="o", markersize=3, capsize=2, color=colors[method],
                            label=method)
            if dense is not None:
                ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label="dense")
            ax.set_title(task if row == 0 else "", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{labels[group]}\n{metric}", fontsize=8)
            if row == len(groups) - 1:
                ax.set_xlabel("ratio", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
    handles, names = axes[0][-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
    limits = {r["zeroshot"].get("limit") for r in with_zs}
    fig.suptitle(f"zero-shot {metric}" + (f" (first {', '.join(map(str, sorted(limits, key=str)))} items per task)"
                                          if limits != {None} else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_heal_curves(records: list[dict], out: Path) -> Path | None:
    """Distillation loss against training tokens, one line per healed run; and, for runs healed
    with `local`, each layer's held-out relative error before and after (one panel per run)."""
    curves = [r for r in records if (r.get("heal") or {}).get("curve")]
    local = [r for r in records if (r.get("heal") or {}).get("layers")]
    if not curves and not local:
        return None
    plt = _plt()
    panels = (1 if curves else 0) + len(local)
    fig, axes = _grid(plt, 1, panels, w=4.2, h=3.2)
    axes = list(axes.flat) if hasattr(axes, "flat") else [axes]
    ax_iter = iter(axes)
    if curves:
        ax = next(ax_iter)
        for r in curves:
            tokens, loss = zip(*r["heal"]["curve"])
            ax.plot(tokens, loss, label=r["name"], lw=1.2)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("distillation loss (KL to the teacher)")
        ax.set_title("distill", fontsize=9)
        ax.legend(fontsize=6)
    for r in local:
        ax = next(ax_iter)
        layers = sorted(r["heal"]["layers"], key=lambda name: int(name.rsplit(".", 1)[-1]))
        index = [int(name.rsplit(".", 1)[-1]) for name in layers]
        for key, label in (("heldout_before", "before"), ("heldout_after", "after")):
            values = [r["heal"]["layers"][name].get(key) for name in layers]
            if any(v is not None for v in values):
                ax.plot(index, [float("nan") if v is None else v for v in values], marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("held-out relative MSE of the layer")
        ax.set_title(f"{r['name']}: local", fontsize=9)
        ax.legend(fontsize=7)
    return _save(plt, fig, out)


def _unit_order(unit: str) -> tuple:
    """'3' -> (3, ''), '3.mlp' -> (3, 'mlp'): layers in order, a layer's parts by name."""
    layer, _, part = str(unit).partition(".")
    return (int(layer), part) if layer.isdigit() else (10**9, str(unit))


def sensitivity_title(record: dict) -> str:
    """The heatmap's title: the run and the dense held-out loss, marked as an estimate when the
    probes scored a sampled LM head (sensitivity's score_vocab; the Δs are then estimates too)."""
    details = record.get("allocation_details") or {}
    base = details.get("base_loss")
    dense = ""
    if isinstance(base, (int, float)):
        dense = (f", dense ≈{base:.3f} (sampled head)" if details.get("base_loss_head") == "sampled"
                 else f", dense {base:.3f}")
    return f"{record.get('name', '')}: held-out Δ loss ({record.get('method')} @ {record.get('ratio')}{dense})"


def plot_sensitivity(record: dict, out: Path) -> Path | None:
    """The sensitivity allocation's measurements (allocation_details["sensitivity"]): units (layers,
    or layer parts) down, candidate ratios across, with ratio 0 (dense, Δ = 0) first; colour = the
    held-out loss increase Δ with that unit alone compressed (symmetric log scale; inf: blank); the
    chosen ratio of each unit framed (straddling two columns when it lies between candidates) and
    written in the row label."""
    import math

    import numpy as np
    details = record.get("allocation_details") or {}
    sensitivity = details.get("sensitivity")
    if not sensitivity:
        return None
    units = sorted(sensitivity, key=_unit_order)
    candidates = sorted({float(k) for u in units for k in sensitivity[u]})
    columns = [0.0] + candidates
    values = np.full((len(units), len(columns)), np.nan)
    for i, unit in enumerate(units):
        values[i, 0] = 0.0
        for key, delta in sensitivity[unit].items():
            values[i, columns.index(float(key))] = float(delta)
    finite = values[np.isfinite(values)]
    plt = _plt()
    from matplotlib.colors import SymLogNorm
    from matplotlib.patches import Rectangle
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    low, high = min(low, 0.0), max(high, low + 1e-12)
    # symmetric log scale: one very sensitive layer (often the first) does not wash out the others
    nonzero = np.abs(finite[finite != 0])
    norm = SymLogNorm(linthresh=max(float(np.median(nonzero)) / 4 if nonzero.size else 1e-3, 1e-6), vmin=low,
                      vmax=high, base=10)
    cmap = "RdBu_r" if low < 0 else "magma_r"
    if low < 0:  # centre the diverging map on Δ = 0
        bound = max(-low, high)
        norm = SymLogNorm(linthresh=norm.linthresh, vmin=-bound, vmax=bound, base=10)
    masked = np.ma.masked_invalid(values)
    fig, ax = plt.subplots(figsize=(2.4 + 0.75 * len(columns), 1.3 + 0.26 * len(units)))
    image = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm)
    for i in range(len(units)):
        for j in range(len(columns)):
            v = values[i, j]
            position = float(norm(v)) if np.isfinite(v) else None  # inf: a blank cell, black text
            strong = position is not None and (abs(position - 0.5) > 0.3 if low < 0 else position > 0.6)
            ax.text(j, i, "inf" if np.isinf(v) else ("" if np.isnan(v) else f"{v:.3g}"), ha="center", va="center",
                    fontsize=5.5, color="white" if strong else "black")
    chosen = details.get("ratios") or {}
    labels = []
    for i, unit in enumerate(units):
        rho = chosen.get(unit)
        if rho is None:
            labels.append(str(unit))
            continue
        x = float(np.interp(float(rho), columns, range(len(columns))))
        ax.add_patch(Rectangle((x - 0.46, i - 0.44), 0.92, 0.88, fill=False, edgecolor="black", linewidth=1.4))
        labels.append(f"{unit}  → {float(rho):.2f}")
    ax.set_xticks(range(len(columns)), [f"{c:g}" for c in columns], fontsize=8)
    ax.set_yticks(range(len(units)), labels, fontsize=6.5)
    ax.set_xlabel("ratio of the unit alone (0: dense)", fontsize=8)
    ax.set_ylabel("unit → chosen ratio", fontsize=8)
    ax.set_title(sensitivity_title(record), fontsize=8)
    top = max(-low, high)
    powers = [10.0 ** k for k in range(math.ceil(math.log10(3 * norm.linthresh)), math.floor(math.log10(top)) + 1)]
    ticks = sorted({0.0, *powers, *([-p for p in powers] if low < 0 else [])})
    fig.colorbar(image, ax=ax, label="Δ next-token NLL (nats)", ticks=ticks or None, format="%g")
    return _save(plt, fig, out)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the (label, bytes, ppl) points that no other point dominates (no more bytes and no
    higher PPL, one of them strictly less), in order of bytes."""
    front = []
    for label, size, ppl in points:
        dominated = any(s <= size and p <= ppl and (s < size or p < ppl) for _, s, p in points)
        if not dominated:
            front.append((size, label))
    return [label for _, label in sorted(front)]


def plot_deploy_pareto(records: list[dict], out: Path) -> Path | None:
    """benchmarks/deploy.py's rows: WikiText-2 PPL (log) against bytes on disk, one panel per
    side-by-side; the Pareto front (no row smaller and better) drawn as a step line, its rows filled."""
    sides = [r for r in records if (r.get("deploy") or {}).get("rows")]
    sides = [(r, [(row["label"], row["checkpoint_bytes"] / 1e6, row["wikitext2"]) for row in r["deploy"]["rows"]
                  if row.get("checkpoint_bytes") and row.get("wikitext2")]) for r in sides]
    sides = [(r, points) for r, points in sides if points]
    if not sides:
        return None
    plt = _plt()
    fig, axes = _grid(plt, 1, len(sides), w=5.2, h=3.8)
    for ax, (r, points) in zip(axes.flat, sides):
        front = pareto_front(points)
        for label, size, ppl in points:
            color = "C0" if label.startswith("dense") else "C1"  # quantised dense / low-rank
            ax.scatter([size], [ppl], s=30, zorder=3, edgecolors=color,
                       facecolors=color if label in front else "none")
            ax.annotate(label, (size, ppl), textcoords="offset points", xytext=(4, 3), fontsize=7)
        steps = sorted((size, ppl) for label, size, ppl in points if label in front)
        xs, ys = [steps[0][0]], [steps[0][1]]
        for size, ppl in steps[1:]:
            xs += [size, size]
            ys += [ys[-1], ppl]
        ax.plot(xs, ys, color="0.5", lw=1, ls="--", zorder=1, label="Pareto front")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_xlabel("checkpoint bytes on disk (MB)")
        ax.set_ylabel("WikiText-2 PPL")
        ax.set_title(f"{r['deploy'].get('model') or r['name']}: filled = on the front", fontsize=9)
        ax.legend(fontsize=7)
    return _save(plt, fig, out)
