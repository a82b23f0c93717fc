"""vLLM engine arguments: ``--engine-arg key=value`` and ``GENQ_WORKER_ENGINE_ARGS``, read by vLLM's parser.

No engine is loaded here: the tests look at the ``AsyncEngineArgs`` genq builds and at the
start-up errors.  That an argument reaches a running engine is checked in test_engine_vllm.py.
"""

from __future__ import annotations

import asyncio

import pytest
import structlog
from pydantic_settings import SettingsError

from broker.settings import BrokerSettings
from worker.engine.base import EngineArgsError, EngineSettings, engine_arg_key, engine_arg_text
from worker.settings import WorkerSettings, parse_engine_arg

ENV = "GENQ_WORKER_ENGINE_ARGS"


@pytest.fixture(autouse=True)
def no_engine_args_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)


# -- text forms (no vLLM needed) --------------------------------------------


def test_keys_take_dashes_underscores_and_dotted_sub_keys() -> None:
    assert engine_arg_key("--enable-prefix-caching") == "enable_prefix_caching"
    assert engine_arg_key(" kv_cache_dtype ") == "kv_cache_dtype"
    assert engine_arg_key("compilation-config.cudagraph_mode") == "compilation_config.cudagraph_mode"
    assert parse_engine_arg("block-size=32") == ("block_size", "32")
    assert parse_engine_arg("enforce_eager") == ("enforce_eager", "")  # a bare switch is on
    assert parse_engine_arg('compilation_config={"mode": 0}') == ("compilation_config", '{"mode": 0}')
    with pytest.raises(EngineArgsError, match="key=value"):
        parse_engine_arg("=3")


def test_json_values_become_command_line_text() -> None:
    assert [engine_arg_text(v) for v in (True, False, None, 32, 0.5, "fp8")] == [
        "true",
        "false",
        "None",
        "32",
        "0.5",
        "fp8",
    ]
    assert engine_arg_text({"mode": 0}) == '{"mode": 0}'
    assert engine_arg_text(["a", "b"]) == '["a", "b"]'


def test_env_is_a_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, '{"enable-prefix-caching": true, "block_size": 32, "compilation_config": {"mode": 0}}')
    assert WorkerSettings().engine_args == {
        "enable_prefix_caching": "true",
        "block_size": "32",
        "compilation_config": '{"mode": 0}',
    }
    monkeypatch.setenv(ENV, "enable_prefix_caching=true")
    with pytest.raises(SettingsError, match="engine_args"):
        WorkerSettings()


def test_engine_args_need_the_vllm_engine() -> None:
    with pytest.raises(EngineArgsError, match="--engine vllm"):
        WorkerSettings(engine="simulated", engine_args={"block_size": "32"}).engine_settings()
    # without any, nothing imports vLLM
    assert WorkerSettings(engine="simulated").engine_settings().engine_args == {}


# -- read by vLLM's parser ---------------------------------------------------

vllm_present = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None, reason="needs vllm (the cpu or gpu extra)"
)


@vllm_present
def test_the_async_engine_args_built(tmp_path) -> None:
    from worker.engine.vllm_engine import VllmEngine

    settings = WorkerSettings(
        engine="vllm",
        max_num_seqs=4,
        engine_args={
            "enable_prefix_caching": "false",
            "block_size": "64",
            "kv_cache_dtype": "fp8",
            "compilation_config.mode": "0",  # vLLM's dotted form
            "disable_log_stats": "false",  # a genq default, overridden
            "max_num_batched_tokens": "4k",  # a genq setting, read with vLLM's types
            "max_logprobs": "7",
        },
    ).engine_settings()
    assert settings.max_num_batched_tokens == 4000 and settings.max_num_seqs == 4
    assert "max_num_batched_tokens" not in settings.engine_args
    args = VllmEngine(settings).engine_args(str(tmp_path))
    assert args.enable_prefix_caching is False
    assert args.block_size == 64
    assert args.kv_cache_dtype == "fp8"
    assert args.compilation_config.mode == 0
    assert args.disable_log_stats is False
    assert args.max_logprobs == 7
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (4, 4000)
    assert args.scheduling_policy == "priority"  # genq's, always
    assert args.model == str(tmp_path)


@vllm_present
def test_a_genq_setting_given_twice_must_agree() -> None:
    same = WorkerSettings(engine="vllm", max_num_seqs=8, engine_args={"max-num-seqs": "8"}).engine_settings()
    assert same.max_num_seqs == 8 and same.engine_args == {}
    only_arg = WorkerSettings(engine="vllm", engine_args={"dtype": "float32", "enforce_eager": ""}).engine_settings()
    assert (only_arg.dtype, only_arg.enforce_eager) == ("float32", True)
    with pytest.raises(EngineArgsError, match=r"max_num_seqs is given twice: --max-num-seqs .* = 8 .* = 16"):
        WorkerSettings(engine="vllm", max_num_seqs=8, engine_args={"max_num_seqs": "16"}).engine_settings()
    with pytest.raises(EngineArgsError, match="one name"):
        WorkerSettings(engine="vllm", engine_args={"served_model_name": '["a", "b"]'}).engine_settings()
    with pytest.raises(EngineArgsError, match=r"max_model_len.*not auto"):
        WorkerSettings(engine="vllm", engine_args={"max_model_len": "auto"}).engine_settings()


@vllm_present
def test_engine_settings_built_by_hand_keep_genq_fields_out_of_engine_args(tmp_path) -> None:
    from worker.engine.vllm_engine import VllmEngine

    engine = VllmEngine(EngineSettings(kind="vllm", engine_args={"max_num_seqs": "4"}))
    with pytest.raises(EngineArgsError, match="max_num_seqs are EngineSettings fields"):
        engine.engine_args(str(tmp_path))


@vllm_present
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"enable_prefix_cache": "true"},
            r"unknown engine argument 'enable_prefix_cache' \(did you mean enable_prefix_caching",
        ),
        ({"block_size": "big"}, r"engine argument block_size=big: argument --block-size: invalid int value: 'big'"),
        ({"kv_cache_dtype": "fp9"}, r"engine argument kv_cache_dtype=fp9: .*invalid choice: 'fp9'"),
        ({"enable_prefix_caching": "maybe"}, r"engine argument enable_prefix_caching: expected true or false"),
        ({"compilation_config": "{mode"}, r"engine argument compilation_config=\{mode: .*CompilationConfig"),
        ({"scheduling_policy": "fcfs"}, r"scheduling_policy is set by genq: .*priority scheduler"),
        ({"skip_tokenizer_init": "true"}, r"skip_tokenizer_init is set by genq"),
    ],
)
def test_refused_arguments_are_named(args: dict[str, str], message: str) -> None:
    with pytest.raises(EngineArgsError, match=message):
        WorkerSettings(engine="vllm", engine_args=args).engine_settings()


@vllm_present
def test_the_worker_command_exits_2_naming_the_argument(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker import main, process

    started: list[WorkerSettings] = []
    monkeypatch.setattr(process, "run", lambda settings, _broker: started.append(settings) or 0)

    assert main.main(["--engine", "vllm", "--engine-arg", "block-size=huge"]) == 2
    assert "engine argument block_size=huge: argument --block-size: invalid int value" in capsys.readouterr().err
    assert main.main(["--engine", "vllm", "--max-num-seqs", "8", "--engine-arg", "max_num_seqs=9"]) == 2
    assert "max_num_seqs is given twice" in capsys.readouterr().err
    assert main.main(["--engine", "vllm", "--engine-arg", "max_num_seqs=0"]) == 2  # genq's own bound
    assert "max_num_seqs" in capsys.readouterr().err
    assert started == []

    # a flag's key wins over the same key in the environment; the others stay
    monkeypatch.setenv(ENV, '{"block_size": 32, "enable_prefix_caching": false}')
    assert main.main(["--engine", "vllm", "--engine-arg", "block_size=64", "--engine-arg", "max_logprobs=7"]) == 0
    assert started[0].engine_args == {"block_size": "64", "enable_prefix_caching": "false", "max_logprobs": "7"}


@vllm_present
def test_serve_refuses_bad_engine_args_before_contacting_redis() -> None:
    from worker.process import EXIT_STARTUP, serve

    settings = WorkerSettings(engine="vllm", engine_args={"no_such_argument": "1"})
    nowhere = BrokerSettings(redis_url="redis://127.0.0.1:1/0")  # would fail differently if reached
    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(serve(settings, nowhere)) == EXIT_STARTUP
    assert [entry["event"] for entry in logs] == ["worker.bad_engine_settings"]
    assert "no_such_argument" in logs[0]["error"]
