"""Figures of benchmark results. matplotlib is imported when a figure is drawn (the Agg
backend: files, no display), never when this module is."""

from __future__ import annotations

from pathlib import Path


def plot_tp_sweep(path: Path, results: dict, title: str) -> None:
    """Throughput against the TP degree (measured, predicted dashed, t_e dotted) and the step
    time split into device and host-only time beside the KV capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "throughput_tok_s" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in results["sampling"]:
        mine = sorted((r for r in rows if r["sampling"] == mode), key=lambda r: r["tp"])
        ts = [r["tp"] for r in mine]
        left.plot(ts, [r["throughput_tok_s"] for r in mine], "o-",
                  label=f"measured, {mode} sampling")
        if any("predicted_throughput_tok_s" in r for r in mine):
            left.plot(ts, [r.get("predicted_throughput_tok_s", float("nan")) for r in mine],
                      "s--", label=f"predicted, {mode} sampling")
        t_e = results["t_e"].get(mode)
        if t_e is not None:
            left.axvline(t_e, ls=":", color=left.lines[-1].get_color(), alpha=0.6)
    left.set_xscale("log", base=2)
    left.set_xlabel("TP degree t (replicas r = G / t)")
    left.set_ylabel("cluster throughput (output tok/s)")
    left.legend(fontsize=8)
    left.set_title("throughput; dotted: t_e")
    mode = results["sampling"][0]
    mine = sorted((r for r in rows if r["sampling"] == mode), key=lambda r: r["tp"])
    x = range(len(mine))
    device = [r["device_ms_per_step"] for r in mine]
    host = [r["host_only_ms_per_step"] for r in mine]
    right.bar(x, device, label="device")
    right.bar(x, host, bottom=device, label="host only (device idle)")
    right.set_xticks(list(x), [f"{r['replicas']}x{r['tp']}" for r in mine])
    right.set_xlabel("replicas x TP degree")
    right.set_ylabel("ms per step")
    twin = right.twinx()
    twin.plot(list(x), [r["kv_capacity_seqs"] for r in mine], "k^-", label="KV capacity")
    twin.set_ylabel("full-length sequences the KV pools hold")
    handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
                 fontsize=8)
    fit = results["amdahl"].get(mode)
    right.set_title(f"step time ({mode} sampling)" + (f"; Amdahl p = {fit['p']:.2f}"
                                                       if fit else ""))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
