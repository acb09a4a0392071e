"""cog.yaml, the container's pins, the OpenAPI schema and predict.py's own logic, without a server.
(The server itself is tested in tests/test_server.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

import predict
import prior
from prior import contract
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
    lambda c: c.update(run="predict.py:Predictor"),  # run and predict together
    lambda c: c["build"].update(gpu="yes"),
], ids=["unknown-key", "run-and-predict", "gpu-not-bool"])
def test_the_config_schema_check_can_fail(config_schema, break_it):
    config = _cog_yaml()
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(config_schema).validate(config)


def test_cog_yaml_builds_what_the_issue_asks():
    config = _cog_yaml()
    build = config["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11"
    assert (ROOT / build["python_requirements"]).is_file()
    assert config["predict"] == openapi.PREDICTOR_REF


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
        f"{openapi.SCHEMA_PATH} does not match predict.py: run .venv/bin/python -m prior.schema")


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


def test_schema_inputs_are_the_documented_ones(fresh_schema):
    schemas = fresh_schema["components"]["schemas"]
    inputs = schemas["Input"]
    props = inputs["properties"]
    assert list(props) == ["prompt", "candidates", "cond_scale", "steps", "seed", "guidance", "sampler"]
    assert [p["x-order"] for p in props.values()] == list(range(7))
    assert inputs["required"] == ["prompt"]
    assert props["prompt"]["type"] == "string" and re.fullmatch(props["prompt"]["pattern"], "  a  ")
    assert not re.match(props["prompt"]["pattern"], " \t ")
    bounds = {name: (props[name]["type"], props[name].get("default"), props[name]["minimum"], props[name]["maximum"])
              for name in ("candidates", "cond_scale", "steps", "seed")}
    assert bounds == {"candidates": ("integer", 2, 1, 32), "cond_scale": ("number", 1.0, 0, 5),
                      "steps": ("integer", contract.DEFAULT_STEPS, 1, 1000), "seed": ("integer", None, 0, 2**32 - 1)}
    assert props["seed"]["nullable"] is True
    assert schemas["guidance"]["enum"] == list(prior.GUIDANCE) and props["guidance"]["default"] == "original"
    assert schemas["sampler"]["enum"] == list(contract.SAMPLERS) and props["sampler"]["default"] == contract.DEFAULT_SAMPLER
    assert all(p.get("description") for p in props.values())
    output = schemas["Output"]
    assert output["required"] == ["text_tokens", "text_embedding", "image_embedding", "candidates", "scores", "chosen", "seed"]
    assert output["properties"]["image_embedding"] == {"type": "string", "format": "uri", "title": "Image Embedding"}
    assert output["properties"]["scores"]["items"] == {"type": "number"}


def test_prompt_pattern_is_the_engines_rule():
    """The schema refuses exactly the prompts the engine refuses: those str.isspace() calls blank."""
    schema = json.loads(openapi.SCHEMA_PATH.read_text())
    pattern = re.compile(schema["components"]["schemas"]["Input"]["properties"]["prompt"]["pattern"])
    for code in [*range(0xD800), *range(0xE000, 0x30000)]:  # every BMP character and two more planes
        c = chr(code)
        for prompt in (c, f"\n{c} \t"):  # a leading newline must not matter ("." would stop at it)
            found = pattern.search(prompt) is not None
            assert found == (pattern.fullmatch(prompt) is not None) == (not c.isspace()), (hex(code), prompt)


def test_weights_path_prefers_env_then_converted_file(tmp_path, monkeypatch):
    monkeypatch.delenv(predict.WEIGHTS_ENV, raising=False)
    assert predict.weights_path() == predict.DEFAULT_WEIGHTS
    original = tmp_path / "prior_ema_fp16.pth"
    monkeypatch.setenv(predict.WEIGHTS_ENV, str(original))
    assert predict.weights_path() == original
    (tmp_path / "prior_ema_fp16.safetensors").write_bytes(b"converted")
    assert predict.weights_path() == tmp_path / "prior_ema_fp16.safetensors"


def test_a_stale_converted_file_is_not_preferred(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The converted file is used only while the .pth beside it is the one it was made from."""
    original = tmp_path / "prior_ema_fp16.pth"
    shutil.copy(tiny_checkpoint, original)
    converted = convert_to_safetensors(original)
    monkeypatch.setenv(predict.WEIGHTS_ENV, str(original))
    assert predict.weights_path() == converted

    os.utime(original, ns=(1, 1))  # same bytes, another mtime (as after a copy): the hash decides
    assert predict.weights_path() == converted
    assert capsys.readouterr().err == ""

    make_checkpoint(original, TINY, seed=99)  # the .pth replaced, the old conversion left behind
    assert predict.weights_path() == original
    assert capsys.readouterr().err.startswith(f"warning: ignoring {converted}: not converted from {original}")

    converted.write_bytes(b"not a safetensors file")
    assert predict.weights_path() == original


def test_setup_with_a_missing_file_fails_with_one_line(tmp_path, monkeypatch):
    missing = tmp_path / "nothing.pth"
    monkeypatch.setenv(predict.WEIGHTS_ENV, str(missing))
    with pytest.raises(prior.WeightsError) as error:
        predict.Predictor().setup()
    assert str(error.value) == f"{missing}: file not found"


def _result(dim: int = 8, candidates: int = 3) -> prior.EmbedResult:
    rng = np.random.default_rng(0)
    return prior.EmbedResult(
        prompts=["p"], tokens=np.arange(77, dtype=np.int64)[None], text_embedding=rng.random((1, dim), dtype=np.float32),
        image_embedding=rng.random((1, dim), dtype=np.float32), candidates=rng.random((1, candidates, dim), dtype=np.float32),
        scores=rng.random((1, candidates), dtype=np.float32), chosen=np.array([1]), seed=7, truncated=[False], steps=4,
        cond_scale=1.0, guidance="original", sampler="ddpm",
    )


def test_each_prediction_writes_a_fresh_directory():
    result = _result()
    first, second = predict.write_arrays(result), predict.write_arrays(result)
    assert first != second
    for folder in (first, second):
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["text_tokens.npy", "text_embedding.npy", "image_embedding.npy", "candidates.npy"])
    np.testing.assert_array_equal(np.load(first / "candidates.npy"), result.candidates[0])
    assert np.load(first / "text_tokens.npy").dtype == np.int64


def test_a_failed_write_leaves_nothing(monkeypatch):
    made = []
    real_mkdtemp = predict.tempfile.mkdtemp
    monkeypatch.setattr(predict.tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    saves, real_save = [], np.save

    def save_then_fail(path, array):
        saves.append(path)
        if len(saves) == 3:
            raise OSError(28, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(predict.np, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        predict.write_arrays(_result())
    assert len(made) == 1 and not Path(made[0]).exists()


def test_serve_rewrites_a_stale_schema_only(tmp_path):
    """What `python -m prior serve` does first: write the schema when missing or stale, else nothing."""
    path = tmp_path / ".cog" / "openapi_schema.json"
    assert openapi.ensure_current(path) is True
    assert openapi.is_current(path)
    modified = path.stat().st_mtime_ns
    assert openapi.ensure_current(path) is False
    assert path.stat().st_mtime_ns == modified
    path.write_text("{}")
    assert openapi.ensure_current(path) is True and openapi.is_current(path)


class _StubModel:
    def embed(self, prompt, **settings):
        return _result()


def test_predict_keeps_only_the_last_two_output_directories(tmp_path):
    predictor = predict.Predictor()
    predictor.model, predictor.output_root, predictor.recent_outputs = _StubModel(), tmp_path, []
    settings = {"candidates": 3, "cond_scale": 1.0, "steps": 4, "seed": 7, "guidance": "original", "sampler": "ddpm"}
    outputs = [predictor.predict("a prompt", **settings) for _ in range(4)]
    folders = [Path(o.image_embedding).parent for o in outputs]
    assert len(set(folders)) == 4 and all(f.parent == tmp_path for f in folders)
    assert [f.exists() for f in folders] == [False, False, True, True]
    assert outputs[-1].seed == 7 and outputs[-1].chosen == 1 and len(outputs[-1].scores) == 3
    np.testing.assert_array_equal(np.load(outputs[-1].candidates), _result().candidates[0])
