"""Settings precedence and checks, and the workflow store's start-up checks."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from comfybridge import __version__
from comfybridge.config import OPTIONS, ConfigError, Settings, load_settings
from comfybridge.core.workflows import WorkflowStore
from comfybridge.errors import WorkflowConfigError

from .helpers import assert_one_line_error, run_cli


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings([], environ={}, cwd=tmp_path)
    assert settings == Settings(workflows=tmp_path / "workflows", data_dir=tmp_path / "data")
    assert (settings.host, settings.port, settings.backends) == ("127.0.0.1", 8000, ("http://127.0.0.1:8188",))
    assert (settings.heartbeat, settings.disconnect_grace, settings.job_idle_timeout) == (1.0, 5.0, 60.0)
    assert (settings.result_ttl, settings.upload_ttl, settings.max_upload_mb) == (86400.0, 3600.0, 100.0)


def test_precedence_flags_env_dotenv_file_defaults(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "comfybridge.toml").write_text(
        "port = 1001\nheartbeat = 2\njob_idle_timeout = 30\nresult_ttl = 50\n"
        'backends = ["10.0.0.1:8188", "gpu2:8189"]\n'
    )
    (tmp_path / ".env").write_text("COMFYBRIDGE_PORT=1002\nCOMFYBRIDGE_HEARTBEAT=3\nCOMFYBRIDGE_JOB_IDLE_TIMEOUT=40\n")
    environ = {"COMFYBRIDGE_PORT": "1003", "COMFYBRIDGE_HEARTBEAT": "4"}
    settings = load_settings(["--port", "1004"], environ=environ, cwd=tmp_path)
    assert settings.port == 1004  # flag
    assert settings.heartbeat == 4.0  # environment
    assert settings.job_idle_timeout == 40.0  # .env
    assert settings.result_ttl == 50.0  # config file
    assert settings.backends == ("http://10.0.0.1:8188", "http://gpu2:8189")
    assert settings.upload_ttl == 3600.0  # default


def test_backends_forms(tmp_path: Path) -> None:
    settings = load_settings([], environ={"COMFYUI_SERVERS": "127.0.0.1:8188,127.0.0.1:8189"}, cwd=tmp_path)
    assert settings.backends == ("http://127.0.0.1:8188", "http://127.0.0.1:8189")
    environ = {"COMFYUI_SERVERS": "a:1", "COMFYBRIDGE_BACKENDS": "https://gpu.example/comfy/"}
    assert load_settings([], environ=environ, cwd=tmp_path).backends == ("https://gpu.example/comfy",)


@pytest.mark.parametrize(("line", "message"), [("port = 18731.9", "port in"), ("emulate = 1.7", "emulate in")])
def test_a_fraction_in_the_config_file_is_refused_where_a_whole_number_is_due(
    tmp_path: Path, line: str, message: str
) -> None:
    (tmp_path / "mine.toml").write_text(f"[comfybridge]\n{line}\n")
    with pytest.raises(ConfigError, match=f"^{message} .*is not a whole number$"):
        load_settings(["--config", "mine.toml"], environ={}, cwd=tmp_path)


def test_config_file_by_flag_or_env(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text("[comfybridge]\nport = 9100\n")
    assert load_settings(["--config", "mine.toml"], environ={}, cwd=tmp_path).port == 9100
    assert load_settings([], environ={"COMFYBRIDGE_CONFIG": "mine.toml"}, cwd=tmp_path).port == 9100


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--port", "abc"], {}, "--port: 'abc' is not a whole number"),
        (["--access-log", "maybe"], {}, "--access-log: 'maybe' is not true or false"),
        (["--trusted-proxies", "notanip"], {}, "--trusted-proxies: 'notanip' names 'notanip', which is not an IP"),
        (["--emulator-dialect", "0.4"], {}, "--emulator-dialect: '0.4' is not a ComfyUI dialect the emulator speaks"),
        (["--emulate", "1", "--backends", "a:1"], {}, "--backends and --emulate: the emulators are the backends"),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag (python -m comfybridge --help"),
        (["--advertise-url", "ftp://x"], {}, "--advertise-url: 'ftp://x' must be empty or a base URL"),
        (["--port", "70000"], {}, "--port: '70000' must be a port number (0-65535)"),
        ([], {"COMFYBRIDGE_HEARTBEAT": "0"}, "COMFYBRIDGE_HEARTBEAT in environment: '0' must be greater than 0"),
        (["--backends", "nohost"], {}, "--backends: 'nohost' names 'nohost', which is not a ComfyUI host:port"),
        (["--allowed-media", "image,pdf"], {}, "--allowed-media: 'image,pdf' unknown media kind 'pdf'"),
        (["--cors-origins", "app.example"], {}, "--cors-origins: 'app.example' names 'app.example', which is not an"),
        (["--cors-origins", "https://a.example/app"], {}, "--cors-origins: 'https://a.example/app' names 'https://a."),
        (["--cors-origins", "null"], {}, "--cors-origins: 'null' names 'null', which is not an origin"),
        (["--config", "missing.toml"], {}, "config file"),
        (["--log-level", "LOUD"], {}, "--log-level: 'LOUD' must be DEBUG, INFO, WARNING or ERROR"),
        (
            ["--emulate", "2"],
            {"COMFYBRIDGE_DATABASE": "postgresql://u@h/db"},
            "--emulate: a cluster (--database) needs ComfyUI servers every bridge reaches",
        ),
    ],
)
def test_bad_settings_name_the_culprit(tmp_path: Path, argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(argv, environ=environ, cwd=tmp_path)
    assert str(caught.value).startswith(message)


def test_unknown_config_key(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'") as caught:
        load_settings(["--config", "c.toml"], environ={}, cwd=tmp_path)
    assert str(tmp_path / "c.toml") in str(caught.value)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('backends = ["10.0.0.5:8188"]\n[comfybridge]\nheartbeat = 2\n', "backends beside the [comfybridge] table"),
        ("[comfybridge]\nheartbeat = 2\n[comfybrige_extra]\nport = 1\n", "comfybrige_extra beside the [comfybridge]"),
        ("comfybridge = 5\n", "comfybridge must be a table of settings"),
    ],
)
def test_settings_beside_the_comfybridge_table_are_refused(tmp_path: Path, text: str, said: str) -> None:
    """A file with a [comfybridge] table dropped whatever sat beside it, without a word: the backends
    fell back to 127.0.0.1:8188. Both forms are taken; one file holds one of them."""
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_settings(["--config", "c.toml"], environ={}, cwd=tmp_path)
    (tmp_path / "c.toml").write_text('[comfybridge]\nbackends = ["10.0.0.5:8188"]\n')
    assert load_settings(["--config", "c.toml"], environ={}, cwd=tmp_path).backends == ("http://10.0.0.5:8188",)


def test_a_bad_value_names_the_file_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "comfybridge.toml").write_text("port = 'eighty'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings([], environ={}, cwd=tmp_path)
    assert str(caught.value).startswith(
        f"port in {tmp_path / 'config' / 'comfybridge.toml'}: 'eighty' is not a whole number"
    )
    (tmp_path / "config" / "comfybridge.toml").write_text("port = 8001\n")
    (tmp_path / ".env").write_text("COMFYBRIDGE_HEARTBEAT=-1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings([], environ={}, cwd=tmp_path)
    assert str(caught.value).startswith(f"COMFYBRIDGE_HEARTBEAT in {tmp_path / '.env'}: '-1'")


def test_version_and_help_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_settings(["--version"], environ={})
    assert capsys.readouterr().out.strip() == f"comfybridge {__version__}"
    with pytest.raises(SystemExit):
        load_settings(["--help"], environ={})
    text = " ".join(capsys.readouterr().out.split())
    assert "listen port (default: 8000) [COMFYBRIDGE_PORT]" in text
    assert "(default: http://127.0.0.1:8188)" in text
    assert "(default: none)" in text  # e.g. api keys


# workflow store --------------------------------------------------------------------------------
def with_aliases(*entries: dict[str, object]) -> dict[str, bytes]:
    """GRAPH as g.json plus an alias file of these entries."""
    return {"g.json": orjson.dumps(GRAPH), "workflow_alias.json": orjson.dumps(list(entries))}


def write(folder: Path, name: str, data: object) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(orjson.dumps(data))


GRAPH = {
    "1": {"class_type": "EmptyImage", "_meta": {"title": "Canvas", "apiinput": "width, height"},
          "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    "3": {"class_type": "Flags", "inputs": {"on": True, "gain": 0.5}},
}  # fmt: skip


def test_alias_dict_form_and_marker_union(tmp_path: Path) -> None:
    write(tmp_path, "g.json", GRAPH)
    write(tmp_path, "workflow_alias.json", {"canvas": "g.json"})
    store = WorkflowStore.load(tmp_path)
    assert store.aliases() == ["canvas"]
    info = store.get("canvas").describe_inputs()
    assert list(info) == ["1/width", "1/height"]
    assert info["1/width"] == {"type": "int", "title": "Canvas", "class": "EmptyImage", "default": 8}


def test_an_apiinput_marker_written_as_a_list_exposes_its_inputs(tmp_path: Path) -> None:
    """`"apiinput": ["width", "height"]` exposed nothing, silently; a marker that names nothing
    readable (a number) stops the load naming the node."""
    graph = {**GRAPH, "1": {**GRAPH["1"], "_meta": {"apiinput": ["width", "height"]}}}
    write(tmp_path, "g.json", graph)
    assert list(WorkflowStore.load(tmp_path).get("g").describe_inputs()) == ["1/width", "1/height"]
    write(tmp_path, "g.json", {**GRAPH, "1": {**GRAPH["1"], "_meta": {"apiinput": 7}}})
    with pytest.raises(WorkflowConfigError, match=r"node 1: _meta\.apiinput must name inputs"):
        WorkflowStore.load(tmp_path)


@pytest.mark.parametrize("aliases", [{"": "g.json"}, [{"alias": " ", "fn": "g.json"}]])
def test_an_empty_alias_is_refused(tmp_path: Path, aliases: object) -> None:
    write(tmp_path, "g.json", GRAPH)
    write(tmp_path, "workflow_alias.json", aliases)
    with pytest.raises(WorkflowConfigError, match="empty"):
        WorkflowStore.load(tmp_path)


def test_alias_list_form_adds_inputs_and_types(tmp_path: Path) -> None:
    write(tmp_path, "g.json", GRAPH)
    write(tmp_path, "workflow_alias.json", [{"alias": "c", "fn": "g.json", "inputs": ["3/on", "3/gain", "1/width"]}])
    info = WorkflowStore.load(tmp_path).get("c").describe_inputs()
    assert {k: v["type"] for k, v in info.items()} == {
        "1/width": "int",
        "1/height": "int",
        "3/on": "bool",
        "3/gain": "float",
    }


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"g.json": b"{not json"}, "g.json: not valid JSON"),
        ({"g.json": orjson.dumps({"nodes": [], "links": []})}, "g.json: not an API-format ComfyUI workflow"),
        (
            with_aliases({"alias": "c", "fn": "g.json", "inputs": ["2/images"]}),
            "g.json: exposed input '2/images' is a link to another node (['1', 0]), not a value",
        ),
        (
            with_aliases({"alias": "c", "fn": "g.json", "inputs": ["1/nope"]}),
            "g.json: exposed input '1/nope': node 1 has no input 'nope'",
        ),
        (
            {"workflow_alias.json": orjson.dumps({"c": "missing.json"})},
            "alias 'c' names 'missing.json', which does not exist",
        ),
        (
            with_aliases({"alias": "c", "fn": "g.json"}, {"alias": "c", "fn": "g.json"}),
            "alias 'c' is defined twice",
        ),
        (  # a typo exposed nothing, unsaid
            with_aliases({"alias": "c", "fn": "g.json", "input": ["1/width"]}),
            "entry 'c': unknown key 'input' (known: alias, description, fn, inputs, thumbnail)",
        ),
    ],
)  # fmt: skip
def test_bad_workflow_folder_names_the_culprit(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(WorkflowConfigError) as caught:
        WorkflowStore.load(tmp_path)
    assert message in str(caught.value)


def test_what_in_the_workflow_folder_is_no_workflow_file_is_named_as_such(tmp_path: Path) -> None:
    """A folder, a link to nothing, a name of another encoding, or an alias naming a path outside the
    folder: each stops the load with what is wrong with it (not "alias names missing file" when there
    is no alias file, and no name that would break every JSON listing)."""
    folder = tmp_path / "workflows"
    graph = (Path(__file__).parent / "fixtures" / "workflows" / "b_emptyimage_save.json").read_bytes()
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: (folder / "d.json").mkdir(), "d.json is not a regular file"),
        (lambda: (folder / "l.json").symlink_to(tmp_path / "gone.json"), "l.json is a link to nothing"),
        (lambda: (folder / os.fsdecode(b"caf\xe9.json")).write_bytes(graph), "is not UTF-8; rename it"),
        (
            lambda: (folder / "workflow_alias.json").write_bytes(orjson.dumps({"abs": str(tmp_path / "g.json")})),
            "alias 'abs' names '" + str(tmp_path / "g.json") + "', which is not a path inside the workflow folder",
        ),
        (
            lambda: (folder / "workflow_alias.json").write_bytes(orjson.dumps({"up": "../g.json"})),
            "alias 'up' names '../g.json', which is not a path inside the workflow folder",
        ),
    ]
    for make, message in cases:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (tmp_path / "g.json").write_bytes(graph)
        make()
        with pytest.raises(WorkflowConfigError) as caught:
            WorkflowStore.load(folder)
        assert message in str(caught.value)


def test_a_link_in_the_workflow_folder_is_followed_wherever_it_points(tmp_path: Path) -> None:
    shared = tmp_path / "shared.json"
    shared.write_bytes((Path(__file__).parent / "fixtures" / "workflows" / "b_emptyimage_save.json").read_bytes())
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "linked.json").symlink_to(shared)
    assert WorkflowStore.load(tmp_path / "workflows").aliases() == ["linked"]


def test_an_alias_may_name_a_workflow_in_a_subfolder(tmp_path: Path) -> None:
    (tmp_path / "portraits").mkdir()
    graph = (Path(__file__).parent / "fixtures" / "workflows" / "b_emptyimage_save.json").read_bytes()
    (tmp_path / "portraits" / "portrait.json").write_bytes(graph)
    (tmp_path / "workflow_alias.json").write_bytes(orjson.dumps({"portrait": "portraits/portrait.json"}))
    assert WorkflowStore.load(tmp_path).aliases() == ["portrait"]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(WorkflowConfigError, match=r"workflow folder .*/nope does not exist"):
        WorkflowStore.load(tmp_path / "nope")


def test_every_setting_is_documented_with_its_default(tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    config = (root / "config" / "comfybridge.toml").read_text()
    shown: dict[str, str] = {}
    for line in config.splitlines():
        key, sep, _ = line.removeprefix("# ").partition(" = ")
        if line.startswith("# ") and sep and key in OPTIONS:
            shown.setdefault(key, line.removeprefix("# "))
    for name in OPTIONS:
        flag = "--" + name.replace("_", "-")
        assert f"`{flag}" in readme, flag
        assert f"COMFYBRIDGE_{name.upper()}" in readme, name
        assert name in shown, name
    # The values the file shows, switched on, are exactly the built-in defaults.
    (tmp_path / "all.toml").write_text("\n".join(shown.values()) + "\n")
    assert load_settings(["--config", "all.toml"], environ={}, cwd=tmp_path) == load_settings(
        [], environ={}, cwd=tmp_path
    )


def test_comfy_outputs_pairs_backends_with_their_folders(tmp_path: Path) -> None:
    (tmp_path / "out-a").mkdir()
    (tmp_path / "out-b").mkdir()
    argv = ["--backends", "127.0.0.1:8188,gpu2:8189", "--comfy-outputs", "127.0.0.1:8188=out-a"]
    settings = load_settings([*argv, "--comfy-inputs", "gpu2:8189=out-b"], environ={}, cwd=tmp_path)
    assert settings.comfy_outputs == (("http://127.0.0.1:8188", tmp_path / "out-a"),)
    assert settings.comfy_inputs == (("http://gpu2:8189", tmp_path / "out-b"),)
    (tmp_path / "out-a").rmdir()
    with pytest.raises(ConfigError, match=r"out-a \(for http://127.0.0.1:8188\) is not a folder"):
        load_settings(argv, environ={}, cwd=tmp_path)
    (tmp_path / "out-a").mkdir()
    (tmp_path / "c.toml").write_text(
        'backends = ["127.0.0.1:8188", "gpu2:8189"]\n'
        f'comfy_outputs = {{"http://gpu2:8189" = "{tmp_path / "out-b"}", "127.0.0.1:8188" = "out-a"}}\n'
    )
    settings = load_settings(["--config", "c.toml"], environ={}, cwd=tmp_path)
    (tmp_path / "d.toml").write_text('comfy_outputs = {"127.0.0.1:8188" = ["out-a"]}\n')
    with pytest.raises(ConfigError, match="must be URL=FOLDER pairs"):
        load_settings(["--config", "d.toml"], environ={}, cwd=tmp_path)
    assert dict(settings.comfy_outputs) == {
        "http://gpu2:8189": tmp_path / "out-b",
        "http://127.0.0.1:8188": tmp_path / "out-a",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--comfy-outputs", "127.0.0.1:8188"], "must be URL=FOLDER pairs"),
        (["--comfy-outputs", "nohost=out"], "names 'nohost', which is not a ComfyUI host:port or URL"),
        (["--comfy-outputs", "127.0.0.1:9999=out"], "http://127.0.0.1:9999 is not one of the backends"),
        (["--comfy-outputs", "127.0.0.1:8188=nothere"], "is not a folder"),
        (["--comfy-outputs", "127.0.0.1:8188=out", "--output-subfolder", "false"], "needs output_subfolder = true"),
        (["--comfy-outputs", "127.0.0.1:8188=out", "--emulate", "1"], "the built-in emulators"),
        (["--comfy-inputs", "127.0.0.1:9999=out"], "http://127.0.0.1:9999 is not one of the backends"),
        (["--comfy-inputs", "127.0.0.1:8188=out,http://127.0.0.1:8188=out"], "names http://127.0.0.1:8188 twice"),
        (["--comfy-inputs", "127.0.0.1:8188=nothere"], "is not a folder"),
    ],
)
def test_folders_that_cannot_be_used_are_refused(tmp_path: Path, argv: list[str], message: str) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(argv, environ={}, cwd=tmp_path)
    assert str(caught.value).startswith(argv[0] + ": ")


@pytest.mark.parametrize("option", ["--max-json-mb", "--max-upload-mb", "--inline-result-kb", "--max-event-mb"])
def test_an_infinite_limit_is_one_line_and_exit_2(tmp_path: Path, option: str) -> None:
    """`inf` (or 1e400) parses as a number; times a megabyte it overflowed into a traceback at start-up."""
    (tmp_path / "workflows").mkdir()
    assert_one_line_error(run_cli(["--emulate", "1", option, "inf"], tmp_path), option)


@pytest.mark.parametrize("option", ["--max-text-kb", "--max-result-mb", "--comfy-timeout", "--result-ttl"])
@pytest.mark.parametrize("value", ["inf", "Infinity", "nan", "1e400"])
def test_a_number_that_is_not_finite_is_refused(tmp_path: Path, option: str, value: str) -> None:
    """Accepted before, then every generate was a 500 (--max-text-kb), every job failed collecting its
    results (--max-result-mb), or no backend ever connected (--comfy-timeout)."""
    with pytest.raises(ConfigError, match=f"{option}.*is not a finite number"):
        load_settings([option, value], environ={}, cwd=tmp_path)


@pytest.mark.parametrize(
    ("files", "argv", "named"),
    [
        ({"conf.d/": b""}, ["--config", "conf.d"], "config file"),
        ({"c.toml": b"port = 8001\n# caf\xe9\n"}, ["--config", "c.toml"], "not UTF-8"),
        ({".env": b"COMFYBRIDGE_HEARTBEAT=2\n# caf\xe9\n"}, [], ".env cannot be read: it is not UTF-8"),
    ],
)
def test_a_settings_file_that_cannot_be_read_is_one_line_and_exit_2(
    tmp_path: Path, files: dict[str, bytes], argv: list[str], named: str
) -> None:
    (tmp_path / "workflows").mkdir()
    for name, data in files.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(data)
    assert_one_line_error(run_cli(["--emulate", "1", *argv], tmp_path), named)


def test_choices_are_learned_in_both_of_comfyuis_forms(tmp_path: Path) -> None:
    """`[["a", "b"], {...}]`, and newer nodes' `["COMBO", {"options": [...]}]` (SaveWEBM's codec in
    ComfyUI 0.3.64's /object_info): the second was skipped, so a wrong value reached ComfyUI."""
    import comfybridge.emulator

    info = orjson.loads((Path(comfybridge.emulator.__file__).parent / "object_info.json").read_bytes())
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveWEBM", "_meta": {"apiinput": "codec"},
              "inputs": {"images": ["1", 0], "filename_prefix": "x", "codec": "vp9", "fps": 24.0, "crf": 32.0}},
    }  # fmt: skip
    write(tmp_path, "clip.json", graph)
    store = WorkflowStore.load(tmp_path)
    store.apply_object_info(info)
    assert store.get("clip").describe_inputs()["2/codec"]["choices"] == ["vp9", "av1"]


def test_a_number_input_takes_the_type_its_node_declares(tmp_path: Path) -> None:
    """ "Save (API Format)" writes a FLOAT of 8.0 as `8`: cfg was an int, and 7.5 refused. Once
    ComfyUI's /object_info says FLOAT it is a float; an INT written as 512.0 becomes an int."""
    import comfybridge.emulator

    info = orjson.loads((Path(comfybridge.emulator.__file__).parent / "object_info.json").read_bytes())
    graph = orjson.loads((Path(__file__).parent / "fixtures" / "workflows" / "sd15_text_to_image.json").read_bytes())
    graph["3"]["inputs"]["cfg"] = 8
    graph["5"]["inputs"]["width"] = 512.0
    write(tmp_path, "t.json", graph)
    write(tmp_path, "workflow_alias.json", [{"alias": "t", "fn": "t.json", "inputs": ["3/cfg", "5/width"]}])
    store = WorkflowStore.load(tmp_path)
    described = store.get("t").describe_inputs()
    assert (described["3/cfg"]["type"], described["5/width"]["type"]) == ("int", "float")
    store.apply_object_info(info)
    described = store.get("t").describe_inputs()
    assert (described["3/cfg"]["type"], described["5/width"]["type"], described["5/width"]["default"]) == (
        "float", "int", 512
    )  # fmt: skip
    assert store.get("t").check_request({"workflow": "t", "3/cfg": 7.5}, lambda _: None, 1024) == {"3/cfg": 7.5}


@pytest.mark.parametrize(("secret", "said"), [("whsec_", "nothing after it"), ("whsec_!!!", "not base64")])
def test_a_webhook_secret_without_a_key_is_refused(tmp_path: Path, secret: str, said: str) -> None:
    """`whsec_` (`whsec_${UNSET}`) decoded to an empty key: every call was signed with a key anyone has."""
    with pytest.raises(ConfigError, match=f"--webhook-secret.*{said}"):
        load_settings(["--webhook-secret", secret], environ={}, cwd=tmp_path)


@pytest.mark.parametrize("value", ["comfy", "/a b", "/comfy?x=1", "/caf%C3%A9", "/a//b", "/..", "/a/./b"])
def test_a_root_path_a_link_could_not_carry_as_it_is_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"--root-path: .* must be empty or a path such as /comfy"):
        load_settings(["--root-path", value], environ={}, cwd=tmp_path)
    settings = load_settings(["--root-path", "/studio/comfy/"], environ={}, cwd=tmp_path)
    assert settings.root_path == "/studio/comfy"  # a trailing slash is dropped: links add their own
