"""Entry point: `python app.py` (locally or as a Hugging Face Space).

Environment: TWOTOWER_MODEL = model spec (default: the shipped default model),
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT as usual for Gradio.
"""
from app import build_demo, launch_options

demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_options())
