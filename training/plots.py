"""Training curves from metrics.jsonl, as PNG files."""

from __future__ import annotations

from pathlib import Path

from core.run_folder import read_records


def load_metrics(path: Path) -> list[dict]:
    """Records of metrics.jsonl; after a resume, the last record of a step wins."""
    by_key: dict[tuple, dict] = {}
    for rec in read_records(path)[0]:
        kind = "eval" if any(k.startswith("eval_") for k in rec) else "train"
        by_key[(rec.get("step", 0), kind, bool(rec.get("final")))] = rec
    return [by_key[k] for k in sorted(by_key)]


def write_plots(metrics_path: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_metrics(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    for name, key, rows, label in [("loss.png", "loss", train, "training loss"),
                                   ("learning_rate.png", "lr", train, "learning rate")]:
        if rows:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=label)
            if key == "loss" and evals:
                ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o",
                        label="eval loss")
            ax.set_xlabel("optimizer step"), ax.set_ylabel(label), ax.grid(alpha=0.3), ax.legend()
            fig.tight_layout(), fig.savefig(out_dir / name, dpi=100), plt.close(fig)
            written.append(out_dir / name)
    rewards = [r for r in records if "reward_margin" in r or "eval_reward_margin" in r]
    if rewards:  # DPO: the implicit rewards of chosen and rejected outputs, and their margin
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "eval_reward_margin"):
            rows = [r for r in rewards if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=key)
        ax.set_xlabel("optimizer step"), ax.set_ylabel("reward (beta x log-ratio)"), ax.grid(alpha=0.3)
        ax.legend(), fig.tight_layout(), fig.savefig(out_dir / "rewards.png", dpi=100), plt.close(fig)
        written.append(out_dir / "rewards.png")
    metric_keys = sorted({k for r in evals for k, v in r.items() if k.startswith("eval_")
                          and k not in ("eval_loss", "eval_num_examples", "eval_num_pairs")
                          and isinstance(v, (int, float))})
    if evals and metric_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in metric_keys:
            ax.plot([r.get("epoch", r["step"]) for r in evals], [r.get(key) for r in evals], marker="o",
                    label=key.removeprefix("eval_"))
        ax.set_xlabel("epoch"), ax.set_ylabel("metric"), ax.grid(alpha=0.3), ax.legend()
        fig.tight_layout(), fig.savefig(out_dir / "eval_metrics.png", dpi=100), plt.close(fig)
        written.append(out_dir / "eval_metrics.png")
    return written
