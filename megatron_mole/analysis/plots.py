"""PNG plots of ``expert_usage.json`` (matplotlib, headless "Agg" backend).

- ``expert_load.png``: one heat map per router, domains (rows) x experts (columns), each cell
  the fraction of the domain's expert uses that went to that expert (rows sum to 1), the
  router's specialisation (I(domain; expert) / H(domain)) in its title;
- ``routing_entropy.png``: mean routing entropy per router (x: routers in layer order), one
  line per domain, and log E (uniform routing) dashed.
"""
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.replace("decoder.layers.", "L").replace(".router", "")


def plot_expert_load(routers: dict, path, title: str = "") -> Path:
    """Heat maps of ``routers`` ({name: summary of analysis.stats.summarize})."""
    plt = _pyplot()
    names = list(routers)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    first = routers[names[0]]
    domains = list(first["load"])
    experts = len(first["load_all"])
    fig, axes = plt.subplots(rows, cols, figsize=(0.5 * experts * cols + 2.2 * cols, 0.45 * len(domains) * rows + 1.6 * rows),
                             squeeze=False)
    image = None
    for ax, name in zip(axes.flat, names):
        load = routers[name]["load"]
        matrix = [load[d] for d in domains]
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"{_short(name)}  spec={routers[name]['specialisation']:.2f}", fontsize=9)
        ax.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=7)
        first_column = list(axes.flat).index(ax) % cols == 0
        ax.set_yticks(range(len(domains)), domains if first_column else [], fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if experts <= 16:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 else "black")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of the domain's expert uses")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def plot_entropy(routers: dict, path, title: str = "") -> Path:
    """Mean routing entropy per router and domain."""
    plt = _pyplot()
    names = [n for n in routers if "entropy" in routers[n]]
    if not names:
        return None
    domains = list(routers[names[0]]["entropy"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.2))
    xs = range(len(names))
    for domain in domains:
        ax.plot(xs, [routers[n]["entropy"].get(domain, float("nan")) for n in names], marker="o",
                label=domain, linewidth=2.5 if domain == "all" else 1.2)
    ax.plot(xs, [routers[n]["max_entropy"] for n in names], "k--", linewidth=0.8, label="log E (uniform)")
    ax.set_xticks(list(xs), [_short(n) for n in names], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("routing entropy (nats)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)
