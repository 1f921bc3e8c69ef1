"""Where problems come from: $SELFIMPROVE_GSM8K, the hub (faked: no test reaches one), the bundled sample."""

import gzip
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import pytest

import agents.data_sources as data_sources
from agents.data_sources import ENV_FOLDER, bundled_source, open_source
from agents.errors import DataError
from agents.gsm8k import parse_record

ROWS = [{"question": "Tom has 3 apples and buys 5. How many?", "answer": "3+5=<<3+5=8>>8\n#### 8"}]


@pytest.fixture
def no_folder(monkeypatch):
    monkeypatch.delenv(ENV_FOLDER, raising=False)


def _fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_the_names_fall_back_to_the_bundled_sample(no_folder):
    test, train = open_source("test"), open_source("train")
    assert (test.kind, train.kind) == ("bundled", "bundled")
    assert test.size == train.size == 500 and all(p.label for p in test.problems + train.problems)
    assert all(p.split == "test" for p in test.problems) and all(p.split == "train" for p in train.problems)
    assert not {p.question for p in test.problems} & {p.question for p in train.problems}
    # the hub was tried first (conftest sets HF_HUB_OFFLINE=1, so only its cache) and the reason is kept
    assert "openai/gsm8k" in test.passed_over[0] and "bundled" in test.describe() and "500 problems" in test.describe()


def test_the_folder_setting_comes_first(monkeypatch, tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    monkeypatch.setenv(ENV_FOLDER, str(tmp_path))
    _fake_datasets(monkeypatch, lambda *a, **k: pytest.fail("the hub must not be asked when the folder is set"))
    source = open_source("test")
    assert (source.kind, source.size, source.location) == ("folder", 1, str(tmp_path / "test.jsonl"))
    with pytest.raises(DataError, match=f"\\${ENV_FOLDER} is {tmp_path}, which has no train.jsonl"):
        open_source("train")


def test_the_hub_comes_before_the_sample_when_it_answers(no_folder, monkeypatch):
    calls = []
    _fake_datasets(monkeypatch, lambda *a, **k: calls.append((a, k)) or ROWS)
    monkeypatch.setattr(data_sources, "hub_reachable", lambda: True)
    source = open_source("train")
    assert source.kind == "hub" and source.size == 1 and calls == [(("openai/gsm8k", "main"), {"split": "train"})]
    assert source.problems[0].split == "train" and source.problems[0].solution == "3+5=8"


def test_an_unreachable_hub_is_asked_for_its_cache_only(no_folder, monkeypatch):
    import huggingface_hub.constants as hub_constants

    seen = []
    config = types.SimpleNamespace(HF_HUB_OFFLINE=False)

    def load(*_a, **_k):
        seen.append((hub_constants.HF_HUB_OFFLINE, config.HF_HUB_OFFLINE))
        return ROWS

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load, config=config))
    monkeypatch.setattr(data_sources, "hub_reachable", lambda: False)
    before = hub_constants.HF_HUB_OFFLINE
    source = open_source("test")
    assert seen == [(True, True)] and source.kind == "hub" and "from the local cache" in source.location
    assert hub_constants.HF_HUB_OFFLINE == before and config.HF_HUB_OFFLINE is False  # restored


def test_a_failing_hub_falls_back_for_names_but_not_for_hub_specs(no_folder, monkeypatch):
    def load(*_a, **_k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, load)
    monkeypatch.setattr(data_sources, "hub_reachable", lambda: True)
    source = open_source("test")
    assert source.kind == "bundled" and "Couldn't reach" in source.passed_over[0]
    with pytest.raises(DataError, match="cannot load openai/gsm8k test from the Hugging Face hub"):
        open_source("gsm8k:test")


def test_the_offline_switches_skip_the_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data_sources.hub_reachable() is False


def test_asking_for_more_than_a_source_holds_names_it_and_its_size(no_folder):
    source = bundled_source("test")
    assert len(source.take(500)) == 500
    with pytest.raises(DataError) as err:
        source.take(501, "episodes")
    message = str(err.value)
    assert "501 episodes" in message and "bundled agents/data/gsm8k/test.jsonl.gz" in message
    assert "holds only 500" in message and "\n" not in message


def test_the_sample_ships_as_package_data():
    from importlib import resources

    folder = resources.files("agents") / "data" / "gsm8k"
    assert {"train.jsonl.gz", "test.jsonl.gz", "LICENSE", "README.md"} <= {f.name for f in folder.iterdir()}
    assert "MIT License" in (folder / "LICENSE").read_text() and "OpenAI" in (folder / "LICENSE").read_text()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'agents = ["data/gsm8k/*"]' in pyproject  # installed by `pip install .`, not only in a checkout


@pytest.mark.skipif(not os.environ.get(ENV_FOLDER), reason=f"needs GSM8K's full files in ${ENV_FOLDER}")
@pytest.mark.parametrize("split", ["train", "test"])
def test_the_sample_is_the_documented_draw_from_the_full_files(split):
    """agents/data/gsm8k/README.md: rank by sha256('bundled' + unit separator + id), keep 500 in file order."""
    lines = [line for line in (Path(os.environ[ENV_FOLDER]) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(True)
             if line.strip()]
    ids = [parse_record(json.loads(line), split).id for line in lines]
    ranked = sorted(range(len(lines)), key=lambda i: hashlib.sha256(f"bundled\x1f{ids[i]}".encode()).hexdigest())
    expected = "".join(lines[i] for i in sorted(ranked[:500]))
    shipped = Path(data_sources.__file__).parent / "data" / "gsm8k" / f"{split}.jsonl.gz"
    assert gzip.decompress(shipped.read_bytes()).decode() == expected
