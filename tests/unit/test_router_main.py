"""`epd router` start-up failures: each one a clear message and exit status 2, before serving."""

from __future__ import annotations

import pytest

from router.main import build_parser, main, make_backend


def test_missing_model_directory(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_unknown_chat_template_is_refused_at_start(tiny_models, capsys):
    code = main(["--model", tiny_models["qwen2_vl"], "--device", "cpu", "--chat-template", "no-such-template"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown chat template 'no-such-template'" in err and "qwen2-vl" in err


def test_media_dir_must_exist(tiny_models, tmp_path, capsys):
    assert main(["--model", tiny_models["qwen2_vl"], "--allowed-local-media-path", str(tmp_path / "none")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_disagg_backend_needs_redis(tiny_models):
    args = build_parser().parse_args(["--model", tiny_models["qwen2_vl"], "--backend", "disagg"])
    with pytest.raises(ValueError, match="--redis-url"):
        make_backend(args)
