"""Gradio UI of the TwoTower explorer: layout, handlers, race, wiring. See app.py to launch."""
from .main import build_demo, launch_options

__all__ = ["build_demo", "launch_options"]
