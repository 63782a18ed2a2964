"""``tuneloop run`` as a user runs it: a subprocess, real HTTP, SIGTERM mid-reply."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

READY_TIMEOUT = 120  # importing torch and transformers on a busy CI machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, model: Path, port: int, trainer: str = "enabled = false") -> Path:
    path = folder / "config.toml"
    path.write_text(f"""
[model]
base = "{model}"
device = "cpu"
max_new_tokens = 200
system_prompt = "You are a test bot."
max_batch = 8
max_queue = 64

[storage]
path = "{folder / 'tuneloop.db'}"

[server]
host = "127.0.0.1"
port = {port}

[trainer]
{trainer}
registry = "{folder / 'models'}"
""")
    return path


class Run:
    """``python -m bot --config FILE run`` with its output read line by line."""

    def __init__(self, config: Path, cwd: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(config), "run"], cwd=cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"no {text!r} in the output:\n{''.join(self.output)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def setup(tiny_model, tmp_path):
    port = free_port()
    return write_config(tmp_path, tiny_model, port), port, tmp_path


def test_sigterm_with_requests_in_flight(setup):
    config, port, folder = setup
    run = Run(config, folder)
    try:
        line = run.wait_for("tuneloop is running", READY_TIMEOUT)
        url = f"http://127.0.0.1:{port}/"
        assert url in line
        out = "".join(run.output)
        assert f"web chat: {url}" in out
        assert "slack: disabled (slack.enabled = false)" in out
        assert "discord: disabled (discord.enabled = false)" in out
        results = asyncio.run(_requests_then_sigterm(url, run.proc))
        started = time.monotonic()
        code = run.proc.wait(timeout=15)
        took = time.monotonic() - started
    finally:
        run.kill()
    output = "".join(run.output)
    assert code == 0, output
    assert took < 10, output
    assert "stopped cleanly" in output
    assert "Traceback" not in output, output

    db = sqlite3.connect(folder / "tuneloop.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, reply, finish_reason FROM exchanges")}
    finally:
        db.close()
    finished = [r for r in results if r[0] == "done"]
    assert finished, results  # the replies finished before the stop...
    for _, exchange_id, text in finished:  # ...are all stored, exactly as streamed
        assert rows[exchange_id][0] == text
    # The first batch completed before SIGTERM; some of the second were cut or refused.
    assert len(rows) >= len(finished) >= 4


async def _requests_then_sigterm(url: str, proc: subprocess.Popen) -> list[tuple]:
    async with aiohttp.ClientSession() as http:
        async def ask(i: int, first: asyncio.Event | None = None) -> tuple:
            body = {"model": "m", "stream": True, "max_tokens": 200, "temperature": 1.0, "seed": i,
                    "messages": [{"role": "user", "content": f"tell me a long story number {i}"}]}
            text, exchange_id = "", None
            try:
                async with http.post(url + "v1/chat/completions", json=body) as r:
                    if r.status != 200:
                        return ("refused", r.status, await r.text())
                    async for raw in r.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return ("error", chunk["error"]["message"], text)
                        if first is not None:
                            first.set()
                        if chunk.get("exchange_id"):
                            exchange_id = chunk["exchange_id"]
                        for c in chunk["choices"]:
                            text += c["delta"].get("content") or ""
            except aiohttp.ClientError as e:
                return ("cut", repr(e), text)
            return ("done", exchange_id, text) if exchange_id else ("cut", None, text)

        # Four complete before the stop.
        before = await asyncio.gather(*(ask(i) for i in range(4)))
        assert all(r[0] == "done" for r in before), before
        # Then sixteen at once, and SIGTERM as soon as the first text streams back.
        first = asyncio.Event()
        tasks = [asyncio.create_task(ask(i, first)) for i in range(4, 20)]
        await asyncio.wait_for(first.wait(), 60)
        proc.send_signal(signal.SIGTERM)
        after = await asyncio.gather(*tasks)
        return list(before) + list(after)


def test_port_in_use_is_one_line(setup):
    config, port, folder = setup
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        proc = subprocess.run([sys.executable, "-m", "bot", "--config", str(config), "run"], cwd=folder,
                              capture_output=True, text=True, timeout=READY_TIMEOUT)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"tuneloop: error: server.port: 127.0.0.1:{port} is already in use; stop the other "
                      "process or choose another port (server.port = 0 picks a free one)"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_stops_and_cancels_the_training_run_it_started(tiny_model, tmp_path):
    """A run the server started (here: its schedule) stops with it, is marked cancelled, and the last line says so."""
    from tuneloop.store import Store

    port = free_port()
    config = write_config(tmp_path, tiny_model, port,
                          'enabled = true\nschedule = "interval:1"\nmin_feedback = 1')
    with Store(tmp_path / "tuneloop.db") as store:  # one feedback item: the schedule's first firing starts a run
        ex = store.add_exchange(platform="cli", user="ann", conversation_id="c1", prompt="hi", reply="yo",
                                messages=[{"role": "user", "content": "hi"}], model_version="base")
        store.rate(ex.id, "bob", "down")
    run = Run(config, tmp_path)
    try:
        run.wait_for("tuneloop is running", READY_TIMEOUT)
        line = run.wait_for("training run started: run=run-1", 60)
        pid = int(re.search(r"pid=(\d+)", line).group(1))
        os.kill(pid, 0)  # the training process is there to be seen
        run.proc.send_signal(signal.SIGINT)
        code = run.proc.wait(timeout=60)
    finally:
        run.kill()
    output = "".join(run.output)
    assert code == 0, output
    assert f"stopped cleanly; training run-1 cancelled (pid {pid} stopped; log " in output, output
    assert "Traceback" not in output, output
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # neither the run nor any process of its group outlived the server
    db = sqlite3.connect(tmp_path / "tuneloop.db")
    try:
        status, error, finished = db.execute(
            "SELECT status, error, finished_at FROM training_runs WHERE id = 1").fetchone()
    finally:
        db.close()
    assert (status, error) == ("cancelled", "cancelled: the server that started it stopped") and finished
