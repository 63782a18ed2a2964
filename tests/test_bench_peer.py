"""``tuneloop bench --peer llamacpp``: the engine against llama.cpp on one GGUF file.

The bench itself needs llama-cpp-python (the optional extra ``llamacpp``) and
is skipped without it; its errors are tested everywhere, with the package
hidden where it is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bot.cli import main

pytestmark = pytest.mark.timeout(180)

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False

needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP,
                                     reason="llama-cpp-python not installed (pip install 'tuneloop[llamacpp]')")


def _config(tmp_path: Path, base: str) -> Path:
    f = tmp_path / "config.toml"
    f.write_text(f'[model]\nbase = "{base}"\n[storage]\npath = "data/t.db"\n')
    return f


def test_peer_without_llama_cpp_is_one_line_error_naming_the_extra(tiny_gguf, tmp_path, monkeypatch, capsys):
    path, _ = tiny_gguf
    # None in sys.modules makes ``import llama_cpp`` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path / "cache"))
    code = main(["--config", str(_config(tmp_path, str(path))), "bench", "--peer", "llamacpp"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("tuneloop: error: ")
    assert "llama-cpp-python is not installed" in err and "pip install 'tuneloop[llamacpp]'" in err
    # It fails before converting the file: nothing was loaded or cached.
    assert not (tmp_path / "cache").exists()


def test_peer_needs_a_gguf_base(tiny_model, tmp_path, capsys):
    code = main(["--config", str(_config(tmp_path, str(tiny_model))), "bench", "--peer", "llamacpp"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1
    assert "is not a GGUF file; llama.cpp reads only GGUF" in err


def test_unknown_peer_is_refused(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    with pytest.raises(SystemExit) as info:
        main(["--config", str(_config(tmp_path, str(path))), "bench", "--peer", "vllm"])
    assert info.value.code != 0 and "invalid choice: 'vllm'" in capsys.readouterr().err


@needs_llama_cpp
def test_a_file_llama_cpp_cannot_read_is_one_line_error(tmp_path):
    from bot.bench_peer import LlamaCpp, load_llamacpp
    from tuneloop.errors import ModelError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="llama.cpp cannot load .*bad.gguf") as info:
        load_llamacpp(bad, 1, 64)
    assert "\n" not in str(info.value)
    # The bench runs llama.cpp in a process of its own: the same one line comes back from there.
    with pytest.raises(ModelError, match="llama.cpp cannot load .*bad.gguf") as info:
        LlamaCpp(bad, 1, 64)
    assert "\n" not in str(info.value)


@needs_llama_cpp
def test_a_dead_peer_process_is_one_line_error(tiny_gguf):
    from bot.bench_peer import LlamaCpp
    from tuneloop.errors import ModelError

    path, _ = tiny_gguf
    peer = LlamaCpp(path, 1, 64)
    made, first, total = peer.one(peer.tokenize("hello"), 3)
    assert made == 3 and 0 < first <= total
    peer._proc.kill()  # as a segfault in ggml would end it
    with pytest.raises(ModelError, match=r"llama.cpp's process ended \(exit status -9\)"):
        peer.one([1, 2], 3)
    peer.close()


@needs_llama_cpp
def test_peer_bench_on_a_tiny_gguf(tiny_gguf, tmp_path):
    from bot.bench import write_markdown
    from bot.bench_peer import format_peer_table, run_peer_bench
    from trainer.gguf import ensure_gguf

    path, _ = tiny_gguf
    folder = ensure_gguf(path, cache_dir=tmp_path / "cache", progress=False)
    prompts = ["hello", "the hell", "tell the"]
    result = run_peer_bench(path, str(folder), prompts=prompts, rounds=2, new_tokens=6, batch=4,
                            dtype="float32", progress=False)
    # Every way made exactly the tokens asked, end of sequence ignored.
    assert result["engine_c1"]["tokens"] == 2 * 6
    assert result["llamacpp_c1"]["tokens"] == 2 * 6
    assert result["engine_batch"]["tokens"] == 2 * 4 * 6
    for key in ("engine_c1", "llamacpp_c1", "engine_batch"):
        assert result[key]["tokens_per_s"] > 0 and 0 < result[key]["ttft_p50"] <= result[key]["latency_p50"]
    # llama.cpp on one thread and on the engine's count; the ratios use the faster.
    by_threads = result["llamacpp_by_threads"]
    assert set(by_threads) == {"1", str(result["threads"])}
    assert all(r["tokens"] == 2 * 6 for r in by_threads.values())
    assert result["llamacpp_c1"] == max(by_threads.values(), key=lambda r: r["tokens_per_s"])
    assert result["llamacpp_c1"] == by_threads[str(result["llamacpp_threads"])]
    peer = result["llamacpp_c1"]["tokens_per_s"]
    assert result["c1_vs_peer"] == pytest.approx(result["engine_c1"]["tokens_per_s"] / peer, rel=1e-2)
    assert result["batch_vs_peer"] == pytest.approx(result["engine_batch"]["tokens_per_s"] / peer, rel=1e-2)
    # llama.cpp's own tokenizer, read from the same file, makes the engine's prompt ids.
    assert result["same_prompt_tokens"] == result["prompts"] == 3
    # The file holds float32 weights and both decode them in float32: llama.cpp
    # computes the model the engine serves, so every greedy reply is the same.
    # (This random tiny model answers newlines; the default model's rate is
    # in docs/benchmarks.md.)
    assert [p["prompt"] for p in result["replies"]] == prompts
    assert all(p["engine"] == p["llamacpp"] != "" for p in result["replies"]), result["replies"]
    assert result["identical_replies"] == 3 and result["agreement"] == 1.0, result["replies"]
    assert set(result["targets"]) == {"engine c=1 >= 1.0x llama.cpp c=1", "engine c=4 >= 3x llama.cpp c=1"}

    table = format_peer_table(result)
    assert "llama.cpp c=1, 1 thread" in table and "engine c=4" in table and "identical greedy replies" in table
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    for _ in range(2):  # a second run replaces its section, never adds one
        write_markdown(doc, "tiny:peer-llamacpp", "`tiny` against llama.cpp", "tuneloop bench --peer llamacpp",
                       [result], formatter=format_peer_table)
    text = doc.read_text()
    assert text.count("<!-- bench:tiny:peer-llamacpp -->") == 1 and "kept" in text
    assert "identical greedy replies (up to 6 tokens): 3/3" in text
