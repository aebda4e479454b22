"""The gateway's event loop (`listeners.loop_factory`, `--loop` of `serve` and `up`): uvloop
where it is installed unless asked otherwise, the standard library's on request, and a clear
configuration error for `--loop uvloop` where it is missing."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from gateway import listeners
from gateway.cli import build_parser, main
from gateway.listeners import LOOPS, loop_factory, run


async def running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_auto_and_uvloop_run_on_uvloop_and_asyncio_on_the_standard_loop():
    assert LOOPS == ("auto", "asyncio", "uvloop")
    assert isinstance(run(running_loop()), uvloop.Loop)  # auto, uvloop being installed
    assert isinstance(run(running_loop(), loop_factory("uvloop")), uvloop.Loop)
    plain = run(running_loop(), loop_factory("asyncio"))
    assert not isinstance(plain, uvloop.Loop) and isinstance(plain, asyncio.BaseEventLoop)
    assert run(asyncio.sleep(0, result=7), loop_factory("asyncio")) == 7  # the coroutine's result comes back


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now raises ImportError
    assert loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ValueError, match="uvloop is not installed"):
        loop_factory("uvloop")
    with pytest.raises(ValueError, match="loop: one of auto, asyncio, uvloop"):
        loop_factory("trio")


def test_the_flag_reaches_serve_and_a_missing_uvloop_is_a_configuration_error(monkeypatch, capsys):
    assert build_parser().parse_args(["serve", "--replica-url", "http://r:1"]).loop == "auto"
    assert build_parser().parse_args(["up", "--loop", "asyncio"]).loop == "asyncio"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--replica-url", "http://r:1", "--loop", "trio"])
    seen = {}
    monkeypatch.setattr(listeners, "serve", lambda *a, **kw: seen.update(kw))
    assert main(["serve", "--replica-url", "http://127.0.0.1:1", "--loop", "asyncio"], environ={}) == 0
    assert seen["loop"] is asyncio.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)
    for argv in (["serve", "--replica-url", "http://127.0.0.1:1"], ["up"]):
        assert main([*argv, "--loop", "uvloop"], environ={}) == 2
        assert "uvloop is not installed" in capsys.readouterr().err
