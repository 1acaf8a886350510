"""Draws docs/lisa_layer.png, the README's picture of a LiSA layer. Run: python docs/make_figure.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

BOXES = {  # name: (x, y, width, height, label, colour)
    "x_prev": (0.2, 4.2, 1.6, 0.7, "x (layer l-1)", "#dddddd"),
    "qk_prev": (2.3, 4.2, 2.2, 0.7, "Q_{l-1}, K_{l-1}\n(full q_proj, k_proj)", "#c6dbef"),
    "s_prev": (5.0, 4.2, 1.9, 0.7, "S_{l-1} = Q K^T / sqrt(d)", "#c6dbef"),
    "x": (0.2, 1.2, 1.6, 0.7, "x (layer l)", "#dddddd"),
    "lowrank": (2.3, 1.2, 2.2, 0.7, "Q_r, K_r: rank r, rotary\n(q_lowrank, k_lowrank)", "#fdd0a2"),
    "delta": (5.0, 1.2, 1.9, 0.7, "Delta = Q_r K_r^T / sqrt(r)", "#fdd0a2"),
    "align": (5.0, 2.7, 1.9, 0.8, "align along heads\nP s + W2 act(W1 s)", "#fdd0a2"),
    "sum": (7.4, 2.0, 1.5, 0.8, "S_l = align + Delta\n+ mask M", "#fdd0a2"),
    "softmax": (9.3, 2.0, 1.3, 0.8, "softmax", "#eeeeee"),
    "out": (11.0, 2.0, 1.9, 0.8, "A_l V_l W_o\n(own v_proj, o_proj)", "#c7e9c0"),
}
ARROWS = [
    ("x_prev", "qk_prev"),
    ("qk_prev", "s_prev"),
    ("s_prev", "align"),
    ("x", "lowrank"),
    ("lowrank", "delta"),
    ("align", "sum"),
    ("delta", "sum"),
    ("sum", "softmax"),
    ("softmax", "out"),
]


def centre(name, side):
    x, y, w, h, *_ = BOXES[name]
    return {"r": (x + w, y + h / 2), "l": (x, y + h / 2), "t": (x + w / 2, y + h), "b": (x + w / 2, y)}[side]


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 5.4))
    for x, y, w, h, label, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#444444"))
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9)
    for a, b in ARROWS:
        start, end = centre(a, "r"), centre(b, "l")
        if (a, b) == ("s_prev", "align"):
            start, end = centre(a, "b"), centre(b, "t")
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#333333"))
    ax.text(0.2, 5.2, "full layer l-1 (or a shared layer handing on its reconstructed S)", fontsize=10, weight="bold")
    ax.text(
        0.2,
        0.6,
        "shared layer l: q_proj / k_proj unused, removed by merge_and_unload(); the KV cache holds K_r (rank r) and V",
        fontsize=10,
        weight="bold",
    )
    ax.text(7.4, 3.2, "S_l is handed on if\nlayer l+1 shares too", fontsize=9, style="italic")
    ax.set_xlim(0, 13.2)
    ax.set_ylim(0.3, 5.6)
    ax.axis("off")
    fig.tight_layout()
    out = Path(__file__).with_name("lisa_layer.png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
