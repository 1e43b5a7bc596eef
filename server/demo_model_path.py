"""Where the built-in demo model (trained by bench/train_demo_model.py) is installed."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "conveyor-demo"


def demo_model_dir() -> Path:
    """The package-data directory of the demo model; raises if it is not installed."""
    path = Path(__file__).resolve().parent / "demo_model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in demo model is not installed at {path}; pass --model DIR "
            "(or train it with bench/train_demo_model.py)"
        )
    return path
