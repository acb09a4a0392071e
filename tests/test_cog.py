"""cog.yaml, the container's pins, the OpenAPI schema and the predictor's own logic, without a server.
(The server itself is tested in tests/test_server.py.)"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

import prior
from prior import contract
from prior import predictor as predict
from prior import schema as openapi
from prior.checkpoint import convert_to_safetensors
from prior.weights import HF_FILENAME, HF_REPO, HF_REVISION
from tests.oracle import TINY, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"  # vendored from cog's source; see tests/data/README.md


def _cog_yaml() -> dict:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.fixture(scope="module")
def config_schema() -> dict:
    return json.loads((DATA / "cog_config_schema_v1.0.json").read_text())


def test_cog_yaml_is_valid_against_cogs_config_schema(config_schema):
    jsonschema.Draft7Validator.check_schema(config_schema)
    jsonschema.Draft7Validator(config_schema).validate(_cog_yaml())


@pytest.mark.parametrize("break_it", [
    lambda c: c["build"].update(gpus=True),  # a key cog does not know
    lambda c: c.update(run="prior/predictor.py:Predictor"),  # run and predict together
    lambda c: c["build"].update(gpu="yes"),
], ids=["unknown-key", "run-and-predict", "gpu-not-bool"])
def test_the_config_schema_check_can_fail(config_schema, break_it):
    config = _cog_yaml()
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(config_schema).validate(config)


def test_cog_yaml_builds_the_predictor_with_the_contracts_concurrency():
    config = _cog_yaml()
    build = config["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11"
    assert (ROOT / build["python_requirements"]).is_file()
    assert config["predict"] == openapi.PREDICTOR_REF
    assert config["concurrency"] == {"max": contract.MAX_CONCURRENCY}
    assert inspect.iscoroutinefunction(predict.Predictor.predict)  # cog allows concurrency > 1 only for async


def test_container_torch_pin_is_one_cog_knows():
    """`cog build` picks the CUDA image and wheel index from this table; an unknown torch stops it."""
    table = json.loads((DATA / "cog_torch_compatibility.json").read_text())
    pins = _pins(ROOT / _cog_yaml()["build"]["python_requirements"])
    cuda = _cog_yaml()["build"]["cuda"]
    known = [e for e in table if e["Torch"] == f"{pins['torch']}+cu{cuda.replace('.', '')}"]
    assert known, f"torch {pins['torch']} with CUDA {cuda} is not in cog's table"
    assert known[0]["CUDA"] == cuda
    assert "3.11" in known[0]["Pythons"]


def test_container_pins_match_the_runtime_pins():
    """Only torch may differ (see requirements-cog.txt); cog comes from build.sdk_version."""
    runtime = _pins(ROOT / "requirements.txt")
    container = _pins(ROOT / _cog_yaml()["build"]["python_requirements"])
    differ = {"torch", "cog"}
    assert {k: v for k, v in container.items() if k not in differ} == {k: v for k, v in runtime.items() if k not in differ}
    assert _cog_yaml()["build"]["sdk_version"] == runtime["cog"]


def test_build_fetches_and_checks_the_same_file_as_prior_weights():
    """cog runs build steps before it copies the project in, so they repeat prior.weights'
    constants instead of importing them: keep the two in step."""
    config = _cog_yaml()
    download, check = config["build"]["run"]
    target = re.search(r"--local-dir (\S+)", download).group(1)
    assert download.split()[:4] == ["hf", "download", HF_REPO, HF_FILENAME]
    assert f"--revision {HF_REVISION}" in download
    assert check == f'echo "{prior.PRIOR_EMA_FP16_SHA256}  {target}/{HF_FILENAME}" | sha256sum --check --strict'
    assert f"PRIOR_WEIGHTS={target}/{HF_FILENAME}" in config["environment"]


@pytest.fixture(scope="module")
def fresh_schema() -> dict:
    return openapi.build_schema()


def test_openapi_schema_is_current(fresh_schema):
    assert openapi.is_current(openapi.SCHEMA_PATH, fresh_schema), (
        f"{openapi.SCHEMA_PATH} does not match prior/predictor.py: run .venv/bin/python -m prior.schema")


def test_a_stale_schema_is_noticed(fresh_schema, tmp_path):
    stale = json.loads(openapi.render(fresh_schema))
    stale["components"]["schemas"]["Input"]["properties"]["candidates"]["maximum"] = 64
    path = tmp_path / "openapi_schema.json"
    path.write_text(openapi.render(stale))
    assert not openapi.is_current(path, fresh_schema)
    path.write_text(openapi.render(fresh_schema))
    assert openapi.is_current(path, fresh_schema)


def test_cog_builds_rewrite_of_the_schema_counts_as_current(fresh_schema, tmp_path):
    """`cog build` writes this file itself: compact, keys sorted, its CLI's version."""
    theirs = {**fresh_schema, "info": {"title": "Cog", "version": "0.99.0"}}
    path = tmp_path / "openapi_schema.json"
    path.write_text(json.dumps(theirs, sort_keys=True, separators=(",", ":")))
    assert openapi.is_current(path, fresh_schema)


def test_schema_inputs_are_the_contracts(fresh_schema):
    """prior/predictor.py spells its bounds as literals (cog's static parser reads them): they must be
    the contract's, which the CLI and the API use."""
    schemas = fresh_schema["components"]["schemas"]
    inputs = schemas["Input"]
    props = inputs["properties"]
    assert list(props) == ["prompt", "candidates", "cond_scale", "steps", "seed", "guidance", "sampler"]
    assert [p["x-order"] for p in props.values()] == list(range(7))
    assert inputs["required"] == ["prompt"]
    assert props["prompt"]["type"] == "string" and props["prompt"]["pattern"] == contract.PROMPT_PATTERN
    assert props["prompt"]["maxLength"] == contract.PROMPT_MAX_CHARS
    bounds = {name: (props[name]["type"], props[name].get("default"), props[name]["minimum"], props[name]["maximum"])
              for name in ("candidates", "cond_scale", "steps", "seed")}
    assert bounds == {
        "candidates": ("integer", contract.DEFAULT_CANDIDATES, *contract.CANDIDATES),
        "cond_scale": ("number", contract.DEFAULT_COND_SCALE, *contract.COND_SCALE),
        "steps": ("integer", contract.DEFAULT_STEPS, 1, 1000),  # 1000: LAION's checkpoint's timesteps
        "seed": ("integer", None, 0, contract.SEED_LIMIT - 1),
    }
    assert props["seed"]["nullable"] is True
    assert schemas["guidance"]["enum"] == list(contract.GUIDANCE) and props["guidance"]["default"] == contract.DEFAULT_GUIDANCE
    assert schemas["sampler"]["enum"] == list(contract.SAMPLERS) and props["sampler"]["default"] == contract.DEFAULT_SAMPLER
    assert all(p.get("description") for p in props.values())
    output = schemas["Output"]
    assert output["required"] == ["text_tokens", "text_embedding", "image_embedding", "candidates", "scores", "chosen", "seed",
                                  "weights_layout"]
    assert output["properties"]["image_embedding"] == {"type": "string", "format": "uri", "title": "Image Embedding"}
    assert output["properties"]["scores"]["items"] == {"type": "number"}


def _engine_accepts(prompt: str) -> bool:
    try:
        contract.check_prompt("prompt", prompt)
    except prior.ArgumentError:
        return False
    return True


def test_prompt_pattern_is_the_engines_rule():
    """The schema refuses exactly the prompts the engine refuses: only whitespace (every character
    str.isspace() calls blank) and invisible characters (NUL, zero-width space, BOM, ...)."""
    schema = json.loads(openapi.SCHEMA_PATH.read_text())
    pattern = re.compile(schema["components"]["schemas"]["Input"]["properties"]["prompt"]["pattern"])
    refused = 0
    for code in [*range(0xD800), *range(0xE000, 0x30000)]:  # every BMP character and two more planes
        c = chr(code)
        for prompt in (c, f"\n{c} \t\u200b"):  # a leading newline must not matter ("." would stop at it)
            found = pattern.search(prompt) is not None
            assert found == (pattern.fullmatch(prompt) is not None) == _engine_accepts(prompt), (hex(code), prompt)
        refused += not _engine_accepts(c)
        assert not c.isspace() or not _engine_accepts(c), hex(code)
    assert refused > sum(chr(c).isspace() for c in range(0x30000)) + 50  # the invisible ones too


@pytest.mark.parametrize("prompt", ["\u200b", "\ufeff\ufeff", "\x00", " \u200b\u2060\u00ad \n", "\u3164\ufe0f"])
def test_invisible_only_prompts_are_refused_everywhere(prompt, tiny_checkpoint):
    """The schema's pattern and the engine's check agree on invisible-only prompts."""
    schema = json.loads(openapi.SCHEMA_PATH.read_text())
    assert not re.search(schema["components"]["schemas"]["Input"]["properties"]["prompt"]["pattern"], prompt)
    with pytest.raises(prior.ArgumentError) as error:
        prior.load(tiny_checkpoint, device="cpu").embed(prompt, steps=1)
    assert error.value.field == "prompt"


def test_weights_path_is_the_contracts_rule(tmp_path, monkeypatch):
    monkeypatch.delenv(contract.WEIGHTS_ENV, raising=False)
    assert predict.weights_path() == contract.resolve_weights() == contract.default_weights()
    original = tmp_path / "prior_ema_fp16.pth"
    monkeypatch.setenv(contract.WEIGHTS_ENV, str(original))
    assert predict.weights_path() == original


def test_a_stale_converted_file_is_not_preferred(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The converted file is used only while the .pth beside it is the one it was made from."""
    original = tmp_path / "prior_ema_fp16.pth"
    shutil.copy(tiny_checkpoint, original)
    converted = convert_to_safetensors(original)
    monkeypatch.setenv(contract.WEIGHTS_ENV, str(original))
    assert predict.weights_path() == converted

    os.utime(original, ns=(1, 1))  # same bytes, another mtime (as after a copy): the hash decides
    assert predict.weights_path() == converted
    assert capsys.readouterr().err == ""

    make_checkpoint(original, TINY, seed=99)  # the .pth replaced, the old conversion left behind
    assert predict.weights_path() == original
    assert capsys.readouterr().err.startswith(f"warning: ignoring {converted.name}: not converted from {original.name}")

    converted.write_bytes(b"not a safetensors file")
    assert predict.weights_path() == original


def test_setup_with_a_missing_file_fails_with_one_line_naming_the_file(tmp_path, monkeypatch):
    """The line reaches the health check, so it names the file without the host's folders."""
    missing = tmp_path / "nothing.pth"
    monkeypatch.setenv(contract.WEIGHTS_ENV, str(missing))
    with pytest.raises(prior.WeightsError) as error:
        predict.Predictor().setup()
    assert str(error.value) == "nothing.pth: file not found"


def _result(dim: int = 8, candidates: int = 3) -> prior.EmbedResult:
    rng = np.random.default_rng(0)
    return prior.EmbedResult(
        prompts=["p"], tokens=np.arange(77, dtype=np.int64)[None], text_embedding=rng.random((1, dim), dtype=np.float32),
        image_embedding=rng.random((1, dim), dtype=np.float32), candidates=rng.random((1, candidates, dim), dtype=np.float32),
        scores=rng.random((1, candidates), dtype=np.float32), chosen=np.array([1]), seed=7, truncated=[False], steps=4,
        cond_scale=1.0, guidance="original", sampler="ddpm",
    )


def test_each_prediction_gets_a_fresh_folder_and_old_ones_go(tmp_path, monkeypatch):
    monkeypatch.setattr(predict.tempfile, "tempdir", str(tmp_path))
    outputs = predict.OutputFolders()
    result = _result()
    folders = []
    for _ in range(outputs.KEEP + 5):
        folders.append(outputs.new())
        contract.write_result(folders[-1], result)
    assert len(set(folders)) == len(folders)
    assert sorted(p.name for p in folders[-1].iterdir()) == sorted(contract.RESULT_FILES)
    np.testing.assert_array_equal(np.load(folders[-1] / "candidates.npy"), result.candidates[0])
    assert np.load(folders[-1] / "text_tokens.npy").dtype == np.int64
    assert len(list(outputs.root.iterdir())) == outputs.KEEP  # bounded: the oldest went
    assert not folders[0].exists() and folders[-outputs.KEEP].exists()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(predict.tempfile, "tempdir", str(tmp_path))
    outputs = predict.OutputFolders()
    saves, real_save = [], np.save

    def save_then_fail(path, array, **kwargs):
        saves.append(path)
        if len(saves) == 3:
            raise OSError(28, "No space left on device")
        real_save(path, array, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(prior.OutputError, match="No space"):
        contract.write_result(outputs.new(), _result())
    assert list(outputs.root.iterdir()) == []
