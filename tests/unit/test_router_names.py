"""vLLM's names at the router's edge: the model is served under --model as given, several
--served-model-name aliases are accepted (responses name the first), /v1/models has vLLM's model
card fields, /version and /ping answer, `epd --version` prints the version."""

from __future__ import annotations

import subprocess
import sys

from test_router_app import make_client, prompts  # noqa: F401 - the fixture

import epd
from router.main import build_parser
from router.settings import RouterSettings


def test_served_model_name_defaults_to_the_model_as_given_and_takes_aliases(tiny_models):
    path = tiny_models["qwen2_vl"]
    assert RouterSettings.from_cli(build_parser().parse_args(["--model", path])).served_model_name == path
    settings = RouterSettings.from_cli(build_parser().parse_args(
        ["--model", path, "--served-model-name", "first", "second"]))
    assert (settings.served_model_name, settings.model_aliases) == ("first", ("second",))


def test_aliases_models_version_and_ping(prompts):  # noqa: F811
    client, _ = make_client(prompts, model_aliases=("second",))
    with client:
        for name in ("tiny", "second"):
            r = client.post("/v1/completions", json={"model": name, "prompt": "hello", "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == "tiny"
        assert client.post("/v1/completions", json={"model": "third", "prompt": "x"}).status_code == 404
        cards = client.get("/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["tiny", "second"]
        assert all(c["parent"] is None and c["permission"][0]["object"] == "model_permission" for c in cards)
        assert client.get("/version").json() == {"version": epd.__version__}
        assert client.get("/ping").status_code == 200 and client.post("/ping").status_code == 200
    out = subprocess.run([sys.executable, "-m", "epd.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"epd {epd.__version__}"
