"""The OpenAPI schema of the cog predictor (prior/predictor.py), as `cog build` would write it to .cog/openapi_schema.json.

cog's HTTP server (coglet) validates inputs and serves GET /openapi.json only when that file
exists; without it every input reaches predict() unchecked. `cog build` writes it with a
static parser in the Go CLI, which is not in the Python wheel. Here the same document is
assembled from cog's own Python inspector (`cog._inspector.create_predictor`, which reads
the predictor's `Input(...)` declarations and output type), following the layout of cog's
Go generator (pkg/schema/openapi_spec.go): Input/Output components, one enum component
per `choices` input, the prediction request/response envelope and the fixed paths.

    python -m prior.schema            write .cog/openapi_schema.json if it is stale
    python -m prior.schema --check    exit 1 if it is stale, write nothing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # a checkout's root (cog.yaml, .cog/)
PREDICTOR_REF = "prior/predictor.py:Predictor"  # as cog.yaml names it, relative to a checkout's root
PREDICTOR_FILE = Path(__file__).resolve().parent / "predictor.py"  # the same file, wherever the package is
SCHEMA_PATH = PROJECT_ROOT / ".cog" / "openapi_schema.json"

_VALIDATION_ERROR_RESPONSE = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}
_ANY_JSON_RESPONSE = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}


def build_schema(predictor_ref: str = PREDICTOR_REF, root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Inspect the predictor (this imports its module) and return the OpenAPI document."""
    import warnings

    import cog
    from cog import _inspector

    module_file, _, class_name = predictor_ref.partition(":")
    module_name = Path(module_file).with_suffix("").as_posix().replace("/", ".")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with warnings.catch_warnings():  # "BasePredictor is deprecated": cog.yaml's `predict:` key still takes it
        warnings.simplefilter("ignore", DeprecationWarning)
        info = _inspector.create_predictor(module_name, class_name)

    input_schema, enums = _input_schema(info.inputs)
    components: dict[str, Any] = {"Input": input_schema, "Output": info.output.json_type(), **enums}
    components.update(_ENVELOPE)
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": cog.__version__},
        "paths": _PATHS,
        "components": {"schemas": components},
    }


def _input_schema(inputs: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Input component and one enum component per input with `choices`, as cog's Go
    generator lays them out (buildInputSchema)."""
    from cog import _adt

    properties: dict[str, Any] = {}
    required: list[str] = []
    enums: dict[str, Any] = {}
    for name, field in inputs.items():
        prop: dict[str, Any] = {"x-order": field.order}
        if field.choices:
            enums[name] = {"title": name, "description": "An enumeration.", "enum": list(field.choices),
                           "type": field.type.primitive.json_type()["type"]}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = name.replace("_", " ").title()
            prop.update(field.type.json_type())
        nullable = field.type.repetition in (_adt.Repetition.OPTIONAL, _adt.Repetition.OPTIONAL_REPEATED)
        if field.default is not None or nullable:  # Optional[T] = Input(default=None) gets "default": null, as in Go
            prop["default"] = field.default
        else:  # no default and not Optional: the caller must send it
            required.append(name)
        if nullable:
            prop["nullable"] = True
        for key, value in (("description", field.description), ("minimum", field.ge), ("maximum", field.le),
                           ("minLength", field.min_length), ("maxLength", field.max_length),
                           ("pattern", field.regex)):
            if value is not None:
                prop[key] = _plain_number(value)
        if field.deprecated:
            prop["deprecated"] = True
        properties[name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _plain_number(value: Any) -> Any:
    """cog's inspector turns ge/le into floats; write 32 rather than 32.0 for integral bounds."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_ENVELOPE: dict[str, Any] = {
    "PredictionRequest": {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": "#/components/schemas/Input"}},
    },
    "PredictionResponse": {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
            "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
            "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    },
    "Status": {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    },
    "HTTPValidationError": {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}},
        },
    },
    "ValidationError": {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    },
}

_PATHS: dict[str, Any] = {
    "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": _ANY_JSON_RESPONSE}}},
    "/health-check": {
        "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                "responses": {"200": _ANY_JSON_RESPONSE}},
    },
    "/predictions": {
        "post": {
            "summary": "Predict",
            "description": "Run a single prediction on the model",
            "operationId": "predict_predictions_post",
            "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
            "responses": {
                "200": {
                    "description": "Successful Response",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}},
                },
                "422": _VALIDATION_ERROR_RESPONSE,
            },
        },
    },
    "/predictions/{prediction_id}/cancel": {
        "post": {
            "summary": "Cancel",
            "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [
                {"required": True, "schema": {"title": "Prediction Id", "type": "string"}, "name": "prediction_id", "in": "path"},
            ],
            "responses": {"200": _ANY_JSON_RESPONSE, "422": _VALIDATION_ERROR_RESPONSE},
        },
    },
}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def is_current(path: Path = SCHEMA_PATH, schema: dict[str, Any] | None = None) -> bool:
    """True when `path` describes the predictor as it is now.

    Compared as JSON values, not text, and without info.version: `cog build` rewrites this
    file with its own generator (compact, keys in another order, its CLI's version), which is
    as current as ours when it describes the same inputs and outputs.
    """
    schema = build_schema() if schema is None else schema
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return _without_version(written) == _without_version(schema)


def _without_version(schema: Any) -> Any:
    if not isinstance(schema, dict) or not isinstance(schema.get("info"), dict):
        return schema
    return {**schema, "info": {k: v for k, v in schema["info"].items() if k != "version"}}


def ensure_current(path: Path = SCHEMA_PATH) -> bool:
    """Rewrite `path` if it is missing or stale. Returns True when it was written."""
    schema = build_schema()
    if is_current(path, schema):
        return False
    from .contract import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:  # a server starting meanwhile never reads half a file
        partial.write_text(render(schema))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prior.schema", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        if is_current():
            print(f"{SCHEMA_PATH} is current")
            return 0
        print(f"{SCHEMA_PATH} is stale: run python -m prior.schema", file=sys.stderr)
        return 1
    print(f"{'wrote' if ensure_current() else 'unchanged:'} {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
