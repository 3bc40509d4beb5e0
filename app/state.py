"""Process-wide state: the model (loaded once, lazily, under a lock), app options, sessions."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

MODEL_ENV = "TWOTOWER_MODEL"      # model spec for checkpoints.load; unset = the default model
COMPILE_ENV = "TWOTOWER_COMPILE"  # "1": static caches + torch.compile; or a compile mode, e.g.
                                  # "reduce-overhead" (CUDA graphs); for GPU hosts (compiling
                                  # takes minutes on a CPU, at the first run of each shape)
PACK_ENV = "TWOTOWER_PACK"        # "0" (or false/no/off): PyTorch's own linear layers on the CPU instead of
                                  # oneDNN-packed ones (twotower.cpu_linear)

_lock = threading.Lock()
_model = None


@dataclass
class Options:
    stream_interval: float = 0.25   # seconds between live updates (a few per second at most)
    max_new_tokens: int = 1024      # the most tokens one request may ask for
    queue_size: int = 16            # requests waiting in the shared compute queue


OPTIONS = Options()


def set_model(model) -> None:
    """Use this model instead of loading one (tests, notebooks)."""
    global _model
    with _lock:
        _model = model


def get_model():
    """The model, loaded on first use; later calls return the same object."""
    global _model
    with _lock:
        if _model is None:
            from twotower import checkpoints
            pack = os.environ.get(PACK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
            model = checkpoints.load(os.environ.get(MODEL_ENV) or None, pack=pack)
            _model = compiled(model, os.environ.get(COMPILE_ENV, ""))
        return _model


def compiled(model, setting: str):
    """The model as TWOTOWER_COMPILE asks: unchanged ("" / "0"), compiled ("1"), or compiled
    with that torch.compile mode."""
    if setting in ("", "0"):
        return model
    try:
        return model.compile(mode=None if setting == "1" else setting)
    except ValueError as e:            # torch names the modes it knows
        raise ValueError(f"{COMPILE_ENV}={setting!r}: {e}") from None


def model_loaded() -> bool:
    return _model is not None


def recommended_config():
    """The sampler settings the UI starts from: the release's defaults with the model's
    recommended ones over them (its checkpoint's "sampler"); read from the checkpoint's
    twotower.json while the model is not loaded yet."""
    from twotower import checkpoints
    from twotower.sampling import SamplerConfig
    with _lock:
        defaults = (_model.sampler_defaults if _model is not None
                    else checkpoints.recommended_settings(os.environ.get(MODEL_ENV) or None))
    return SamplerConfig.recommended(defaults)


@dataclass
class StopFlag:
    """Set by the Stop button; long loops that do not yield (the timed race runs) check it."""
    requested: bool = False


@dataclass
class Session:
    """What one browser session keeps on the server (gr.State; never sent to the browser).

    `trace` is filled while a run goes on, so after Stop the views still show what was
    computed. `state` is "running" until the run ends ("done") or fails ("failed"); a run
    that was cancelled stays "running" and `settle` shows it as stopped.
    """
    trace: object | None = None
    state: str = "done"
    settled: bool = True           # views of `trace` are drawn
    race: tuple | None = None
    race_state: str = "done"
    stop: StopFlag = field(default_factory=StopFlag)
    ar: tuple | None = None        # (trace, the AR model's predictions for it): the inspector's cache
    fork: object | None = None     # the last fork (spliced: inherited steps + its own)
    fork_parent: object | None = None
    fork_state: str = "done"
    fork_running: tuple | None = None    # (parent, the running fork's own trace, filled as it goes): kept on Stop
    fork_tab_for: object | None = None   # the trace whose settings the Fork tab was last filled with

    def begin(self, trace, state: str = "running") -> None:
        self.trace, self.state, self.settled = trace, state, False

    def begin_new(self, trace, state: str = "running") -> None:
        """A new run or an opened trace: the last fork belonged to the run before it."""
        self.begin(trace, state)
        self.fork, self.fork_parent, self.fork_state, self.fork_running = None, None, "done", None
