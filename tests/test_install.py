"""The package as `pip install` leaves it: declared dependencies, the `prior` command, a
non-editable install that runs from any folder and keeps the weights in a user cache."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The modules of commands whose packages come with an extra, and those extras.
EXTRAS_OF_MODULE = {"batch.py": ["batch"], "search.py": ["search"], "evaluate.py": ["eval"], "schema.py": ["serve"],
                    "serve.py": ["serve"], "predictor.py": ["serve"], "tables.py": ["batch", "search", "eval"]}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions() -> dict[str, set[str]]:
    """distribution -> the prior/ modules that import it (any import, top level or lazy)."""
    by_module = importlib.metadata.packages_distributions()
    stdlib = sys.stdlib_module_names
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "prior").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "prior":
                    continue
                for distribution in by_module.get(top, [top]):
                    found.setdefault(distribution.lower().replace("_", "-"), set()).add(path.name)
    return found


def test_every_imported_package_is_declared_and_every_declared_one_used():
    runtime = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {extra: {_name(r) for r in requirements} for extra, requirements in PYPROJECT["optional-dependencies"].items()}
    imported = _imported_distributions()
    for distribution, modules in imported.items():
        if distribution in runtime:
            continue
        for module in sorted(modules):
            assert module in EXTRAS_OF_MODULE, f"{module} imports {distribution}, not in [project] dependencies"
            for extra in EXTRAS_OF_MODULE[module]:
                assert distribution in extras[extra], f"{module} imports {distribution}, not in the {extra!r} extra"
    assert runtime <= set(imported), f"declared but never imported: {sorted(runtime - set(imported))}"
    assert PYPROJECT["scripts"] == {"prior": "prior.cli:main"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A new virtualenv with this package installed from a copy of the repository, not
    editable. Its dependencies come from this environment's site-packages (a .pth file), so
    nothing is downloaded; the package itself is built and installed by pip."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(source)  # the install must not need the copy it came from
    return env_dir


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PRIOR_WEIGHTS", "PRIOR_CACHE", "XDG_CACHE_HOME")}
    return {**env, "HOME": str(home), "OMP_NUM_THREADS": "1"}


def test_installed_prior_embeds_from_any_folder(installed, tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint, tmp_path / "mine.pth")
    env = _clean_env(tmp_path / "home")
    done = subprocess.run([installed / "bin" / "prior", "embed", "a cat", "--weights", "mine.pth", "--steps", "2",
                           "--seed", "1", "--quiet", "--out", "out"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("wrote out/ ")
    assert len(list((tmp_path / "out").iterdir())) == 5


def test_installed_package_keeps_weights_in_the_user_cache(installed, tmp_path):
    env = _clean_env(tmp_path / "home")
    code = "import prior, prior.contract as c; print(prior.__file__); print(c.weights_dir()); print(c.default_weights())"
    done = subprocess.run([installed / "bin" / "python", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    package, folder, default = done.stdout.splitlines()
    assert Path(package).is_relative_to(installed) and not Path(package).is_relative_to(ROOT)
    assert folder == str(tmp_path / "home" / ".cache" / "conditioned-prior")
    assert default == f"{folder}/prior_ema_fp16.pth"
    env["PRIOR_CACHE"] = str(tmp_path / "mine")
    done = subprocess.run([installed / "bin" / "python", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.splitlines()[1] == str(tmp_path / "mine")


def test_installed_prior_serve_answers(installed, tiny_checkpoint, tmp_path):
    """`prior serve` from the installed package (no checkout): the predictor ships inside it, the
    schema goes to `server/` in the weights folder, and a prediction is served."""
    import json
    import signal
    import socket
    import time
    import urllib.request

    shutil.copy(tiny_checkpoint, tmp_path / "mine.pth")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clean_env(tmp_path / "home")
    env["PATH"] = f"{installed / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path / "server.log"  # a file, not a pipe nobody reads: a full pipe would block the server
    with open(log, "wb") as out:
        server = subprocess.Popen([installed / "bin" / "prior", "serve", "--port", str(port), "--weights", "mine.pth"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        status = None
        while status != "READY":
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health-check", timeout=5) as r:
                    status = json.load(r)["status"]
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(url + "/predictions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"input": {"prompt": "a cat", "steps": 2, "seed": 1}}).encode())
        with urllib.request.urlopen(request, timeout=120) as r:
            assert json.load(r)["status"] == "succeeded"
        schema = tmp_path / "home" / ".cache" / "conditioned-prior" / "server" / ".cog" / "openapi_schema.json"
        assert json.loads(schema.read_text())["components"]["schemas"]["Input"]["required"] == ["prompt"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
