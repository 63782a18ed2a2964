"""A GGUF base: converted once into a model folder that loads as the file's model, or a one-line error."""

from __future__ import annotations

import json
import logging
import shutil
import threading

import pytest
import torch

from trainer import gguf
from tuneloop.errors import ModelError

pytestmark = pytest.mark.timeout(120)


def _converting(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainer.gguf" and "converting" in r.getMessage()]


def test_conversion_is_the_files_model_with_its_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, source = tiny_gguf
    folder = gguf.ensure_gguf(path, cache_dir=tmp_path, progress=False)
    meta = json.loads((folder / "tuneloop.json").read_text())
    assert meta["sha256"] == gguf.file_hash(path) and meta["architecture"] == "llama"
    assert folder.name.startswith("gguf-tiny-llama.F32-") and folder.parent == tmp_path

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    assert meta["parameters"] == sum(p.numel() for p in source.parameters())
    ids = torch.tensor([[5, 9, 40, 77, 100, 3], [1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        # q/k rows come back un-permuted, norms and tied embeddings kept: the same logits.
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-6)

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.decode(tok("hello the world")["input_ids"]) == "hello the world"
    assert tok.convert_ids_to_tokens(tok("hello")["input_ids"]) == ["hell", "o"]  # the file's merges
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_converted_once_keyed_by_content(tiny_gguf, tmp_path, caplog):
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="trainer.gguf")
    first = gguf.ensure_gguf(path, cache_dir=cache, progress=False)
    stamp = (first / "tuneloop.json").stat().st_mtime_ns
    # The same content at another path is the same model: no second conversion.
    elsewhere = tmp_path / "copy" / path.name
    elsewhere.parent.mkdir()
    shutil.copy(path, elsewhere)
    assert gguf.ensure_gguf(elsewhere, cache_dir=cache, progress=False) == first
    assert (first / "tuneloop.json").stat().st_mtime_ns == stamp
    assert len(_converting(caplog)) == 1
    # Changed content under the same name: a new folder beside the old one.
    with elsewhere.open("ab") as f:
        f.write(b"\0" * 32)  # padding after the tensors: still a readable GGUF
    changed = gguf.ensure_gguf(elsewhere, cache_dir=cache, progress=False)
    assert changed != first and first.exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no building folders left


def test_two_processes_at_once_convert_once(tiny_gguf, tmp_path, caplog):
    """The file lock: a second caller waits for the first's conversion and takes its folder."""
    path, _ = tiny_gguf
    caplog.set_level(logging.INFO, logger="trainer.gguf")
    results, errors = [], []

    def run():
        try:
            results.append(gguf.ensure_gguf(path, cache_dir=tmp_path, progress=False))
        except Exception as e:  # noqa: BLE001 — reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(results) == 3
    assert len(_converting(caplog)) == 1


def test_half_made_folder_is_converted_again(tiny_gguf, tmp_path):
    """A folder without its metadata (a conversion killed between files) is never taken as done."""
    path, _ = tiny_gguf
    folder = gguf.ensure_gguf(path, cache_dir=tmp_path, progress=False)
    (folder / "tuneloop.json").unlink()
    assert not gguf.is_complete(folder, gguf.file_hash(path))
    again = gguf.ensure_gguf(path, cache_dir=tmp_path, progress=False)
    assert again == folder and gguf.is_complete(folder, gguf.file_hash(path))


@pytest.mark.parametrize("content,message", [
    (b"not a model at all\n", "is not a GGUF file"),
    (None, "does not exist"),
])
def test_bad_file_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message) as info:
        gguf.ensure_gguf(path, cache_dir=tmp_path / "cache", progress=False)
    assert "\n" not in str(info.value)


def test_truncated_file_fails_in_one_line_and_leaves_nothing(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])  # the magic and part of the header
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="cannot read GGUF file cut.gguf") as info:
        gguf.ensure_gguf(cut, cache_dir=cache, progress=False)
    assert "\n" not in str(info.value)
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # no folder, finished or half-made
