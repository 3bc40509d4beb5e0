"""The app's API through gradio_client, served in-process on a free port with a tiny model."""
from __future__ import annotations

import json
import time

import pytest

gradio_client = pytest.importorskip("gradio_client")

from tests.tiny_app import launch, tiny_app_model    # noqa: E402
from twotower.runner import encode_prompt, run       # noqa: E402
from twotower.sampling import SamplerConfig          # noqa: E402

DEFAULTS = dict(max_new_tokens=48, block_size=16, steps=4, threshold=0.9, temperature=0.0, top_k=0,
                top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, remasking="confidence", seed=0,
                stop_at_eos=False)


def settings(**changes) -> list:
    return list({**DEFAULTS, **changes}.values())


class Counting:
    """Wraps model.denoise to count passes and optionally slow them down."""

    def __init__(self, model):
        self.calls, self.delay, self.inner = 0, 0.0, model.denoise
        model.denoise = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def served():
    model = tiny_app_model()
    counter = Counting(model)
    demo, url = launch(model, 0)
    client = gradio_client.Client(url, verbose=False)
    yield client, model, counter
    client.close()
    demo.close()


def generate(client, prompt="Hello there", mode="diffusion", capture=False, **changes):
    return client.submit(prompt, mode, *settings(**changes), capture, "first, last", api_name="/generate")


def test_endpoints_are_named(served):
    client, _, _ = served
    names = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/race"} <= set(names)


def test_generate_streams_steps_and_ends_with_the_text(served):
    client, model, _ = served
    job = generate(client, threshold=0.5)
    final = job.result(timeout=120)
    updates = job.outputs()
    live = [json.loads(u[0]) for u in updates[:-1]]
    assert len(updates) >= 4, "several live updates"
    assert all(d["live"] for d in live) and not json.loads(final[0])["live"]
    assert [d["progress"]["nfe"] for d in live] == sorted(d["progress"]["nfe"] for d in live)
    cfg = SamplerConfig(**{**DEFAULTS, "threshold": 0.5})
    trace, events = run(model, [encode_prompt(model, "Hello there")], cfg)
    for _ in events:
        pass
    assert final[1] == trace.done.texts[0]               # same text as the library gives
    assert final[2].startswith("**Finished**")
    data = json.loads(final[0])
    assert len(data["frames"]) == trace.done.nfe and data["top"]


def test_ar_mode_streams_tokens(served):
    client, _, _ = served
    final = generate(client, mode="ar", max_new_tokens=6).result(timeout=120)
    data = json.loads(final[0])
    assert data["mode"] == "ar" and len(data["frames"]) == 6 and "6 tokens" in final[2]


def test_race_returns_both_runs(served):
    client, _, _ = served
    view, table, plot, status = client.predict("Hello there", *settings(max_new_tokens=32), api_name="/race")
    runs = json.loads(view)["runs"]
    assert [r["mode"] for r in runs] == ["ar", "diffusion"]
    for r in runs:
        assert r["stats"]["tokens"] == 32 and r["frames"]
        times = [f[2] for f in r["frames"]]
        assert times == sorted(times) and times[-1] <= r["stats"]["seconds"] * 1000 + 1
    assert runs[0]["stats"]["nfe"] == 32 and runs[1]["stats"]["nfe"] < 32
    assert "tokens / second" in table and "Replaying" in status


@pytest.mark.parametrize("prompt, changes, message", [
    ("Hello", {"threshold": 1.5}, "maximum"),                      # outside the slider: Gradio says so
    ("", {}, "empty"),                                             # SamplerConfig / runner errors
    ("x" * 5000, {}, "context"),
    ("Hello", {"remasking": "sideways"}, "sideways"),
])
def test_invalid_input_errors_and_the_next_call_works(served, prompt, changes, message):
    client, _, _ = served
    with pytest.raises(Exception, match=message):
        generate(client, prompt, **changes).result(timeout=60)
    final = generate(client, max_new_tokens=8).result(timeout=60)
    assert final[2].startswith("**Finished**")


def test_cancel_stops_the_computation(served):
    client, _, counter = served
    counter.delay = 0.03
    try:
        job = generate(client, max_new_tokens=1024, steps=16, threshold=1.0)
        deadline = time.time() + 60
        while len(job.outputs()) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert len(job.outputs()) >= 3, "the run should stream before it is cancelled"
        job.cancel()
        time.sleep(1.0)
        calls = counter.calls
        time.sleep(1.0)
        assert counter.calls - calls <= 1, "the denoiser kept running after cancel"
    finally:
        counter.delay = 0.0
    assert generate(client, max_new_tokens=8).result(timeout=60)[2].startswith("**Finished**")


def solo_text(model, prompt: str) -> str:
    trace, events = run(model, [encode_prompt(model, prompt)], SamplerConfig(**DEFAULTS))
    for _ in events:
        pass
    return trace.done.texts[0]


def test_two_users_at_once_each_get_their_own_result(served):
    client, model, _ = served
    other = gradio_client.Client(client.src, verbose=False)     # a second user, own session
    try:
        jobs = {p: c.submit(p, "diffusion", *settings(), False, "first", api_name="/generate")
                for p, c in (("Hello there", client), ("Good morning to you", other))}
        results = {p: job.result(timeout=120) for p, job in jobs.items()}
    finally:
        other.close()
    for prompt, final in results.items():
        assert final[1] == solo_text(model, prompt) and final[2].startswith("**Finished**")
    assert results["Hello there"][0] != results["Good morning to you"][0]


def test_memory_stays_flat_over_many_runs(served):
    """The app keeps the last trace per session, not every run: live Trace objects stay bounded."""
    import gc

    from twotower.trace import Trace
    client, _, _ = served

    def live_traces():
        gc.collect()
        return sum(isinstance(o, Trace) for o in gc.get_objects())

    generate(client, max_new_tokens=16).result(timeout=120)
    before = live_traces()
    for _ in range(12):
        generate(client, max_new_tokens=16).result(timeout=120)
    assert live_traces() <= before + 1
