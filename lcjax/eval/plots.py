"""One PNG per evaluation: training curves, accuracy heatmap (length x depth), perplexity by position."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def plot_loss(ax, rows: list[dict]) -> None:
  steps = [r["step"] for r in rows if "train/loss" in r]
  ax.plot(steps, [r["train/loss"] for r in rows if "train/loss" in r], label="train loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_yscale("log")
  ax.set_title("training loss")
  ax.grid(alpha=0.3)


def plot_accuracy_heatmap(ax, result: dict) -> None:
  cells = result["cells"]
  lengths = sorted({c["length"] for c in cells})
  if result.get("depths"):
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(lengths), len(depths)), np.nan)
    for c in cells:
      grid[lengths.index(c["length"]), depths.index(c["depth"])] = c["accuracy"]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("needle depth")
    for i in range(len(lengths)):
      for j in range(len(depths)):
        if np.isfinite(grid[i, j]):
          ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                  color="black" if grid[i, j] > 0.5 else "white", fontsize=8)
  else:
    grid = np.asarray([[c["query_accuracy"] for c in cells]]).T
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks([0], ["per query"])
  ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_ylabel("context length")
  ax.set_title(f"{result['task']}: acc {result['accuracy']:.2f} (chance {result['chance']:.2g})")
  plt.colorbar(im, ax=ax, fraction=0.046)


def plot_perplexity(ax, result: dict) -> None:
  mids = [(b["start"] + b["end"] - 1) / 2 for b in result["buckets"]]
  ax.plot(mids, [b["perplexity"] for b in result["buckets"]], marker="o")
  ax.set_xlabel("token position")
  ax.set_ylabel("perplexity")
  ax.set_title(f"{result['task']}: ppl {result['perplexity']:.2f} by position")
  ax.grid(alpha=0.3)


def plot_run(path: str, *, train_rows: list[dict], results: dict, title: str = "") -> str:
  """Writes a PNG with a panel for the loss curve and for each evaluation result; returns path."""
  panels = []
  if any("train/loss" in r for r in train_rows):
    panels.append(lambda ax: plot_loss(ax, train_rows))
  for name, result in results.items():
    if name == "perplexity":
      panels.append(lambda ax, r=result: plot_perplexity(ax, r))
    else:
      panels.append(lambda ax, r=result: plot_accuracy_heatmap(ax, r))
  if not panels:
    raise ValueError("plot_run: nothing to plot (no train/loss rows and no results)")
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
  for panel, ax in zip(panels, axes[0]):
    panel(ax)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
