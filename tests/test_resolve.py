"""Model resolution: every route (local dir, config.json, HF cache, shipped, hub), every user error,
and the shipped configs pinned to the published parameter counts."""

import json

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_doctor import resolve
from lora_doctor.errors import LoraDoctorError
from lora_doctor.resolve import resolve_model_config, shipped_model_ids

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
}


def write_config(folder, data=TINY_LLAMA):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(data) if isinstance(data, dict) else data)
    return path


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Point the HF cache at an empty folder so the developer's real cache never leaks in."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def fake_cached_repo(cache, repo_id, data, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out a repo the way huggingface_hub caches it: refs/main -> snapshots/<commit>/config.json."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return write_config(repo / "snapshots" / commit, data)


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything tries to download."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"hub was called: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


# --- routes -----------------------------------------------------------------------------------


def test_local_directory(tmp_path, empty_hub_cache, no_hub):
    path = write_config(tmp_path / "my-model")
    r = resolve_model_config(str(tmp_path / "my-model"))
    assert r.source == "local directory"
    assert r.location == str(path)
    assert r.model_id == str(tmp_path / "my-model")
    assert type(r.config).__name__ == "LlamaConfig"
    assert (r.config.hidden_size, r.config.num_key_value_heads) == (64, 2)


def test_saved_tiny_model_directory(tiny_gpt2_dir, empty_hub_cache, no_hub):
    r = resolve_model_config(str(tiny_gpt2_dir))
    assert r.source == "local directory"
    assert r.config.model_type == "gpt2"


def test_config_json_path(tmp_path, empty_hub_cache, no_hub):
    path = write_config(tmp_path / "m")
    r = resolve_model_config(str(path))
    assert (r.source, r.location) == ("local config.json", str(path))
    assert r.config.num_hidden_layers == 2


def test_local_directory_beats_shipped_name(tmp_path, monkeypatch, empty_hub_cache, no_hub):
    """A folder named like a shipped model is what the user meant."""
    narrow = {**TINY_LLAMA, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
    write_config(tmp_path / "gpt2", narrow)
    monkeypatch.chdir(tmp_path)
    r = resolve_model_config("gpt2")
    assert r.source == "local directory"
    assert r.config.hidden_size == 32


def test_hf_cache(empty_hub_cache, no_hub):
    path = fake_cached_repo(empty_hub_cache, "someorg/cached-model", TINY_LLAMA)
    r = resolve_model_config("someorg/cached-model")
    assert (r.source, r.location) == ("HF cache", str(path))
    assert r.config.vocab_size == 256


def test_hf_cache_honours_hf_home(tmp_path, monkeypatch, no_hub):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    fake_cached_repo(tmp_path / "home" / "hub", "someorg/home-model", TINY_LLAMA)
    assert resolve_model_config("someorg/home-model").source == "HF cache"


def test_hf_cache_beats_shipped(empty_hub_cache, no_hub):
    """What the user downloaded wins over the copy shipped in the package."""
    fake_cached_repo(empty_hub_cache, "mistralai/Mistral-7B-v0.1", TINY_LLAMA)
    r = resolve_model_config("mistralai/Mistral-7B-v0.1")
    assert r.source == "HF cache"
    assert r.config.hidden_size == 64


@pytest.mark.parametrize(
    "typed, repo_id",
    [
        ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1"),
        ("MISTRALAI/mistral-7b-V0.1", "mistralai/Mistral-7B-v0.1"),
        ("Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1"),
        ("gpt2", "openai-community/gpt2"),
        ("openai-community/gpt2", "openai-community/gpt2"),
        ("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
    ],
)
def test_shipped_ids_and_aliases(typed, repo_id, empty_hub_cache, no_hub):
    r = resolve_model_config(typed)
    assert r.source == "shipped config"
    assert r.model_id == typed
    assert r.location == str(resolve.shipped_config_path(repo_id))


def test_shipped_config_never_runs_remote_code(empty_hub_cache, no_hub):
    r = resolve_model_config("tiiuae/falcon-7b", trust_remote_code=True)
    assert type(r.config).__module__.startswith("transformers.models.falcon")


def test_hub_fetches_config_only(tmp_path, monkeypatch, empty_hub_cache):
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(write_config(tmp_path / "downloaded"))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(resolve, "_unreachable", lambda endpoint: "")
    r = resolve_model_config("someorg/online-model", offline=False)
    assert calls == [("someorg/online-model", "config.json")]
    assert r.source == "hub (config only)"
    assert r.location.endswith("/someorg/online-model/blob/main/config.json")
    assert r.config.hidden_size == 64


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_skips_hub(how, monkeypatch, empty_hub_cache, no_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config("someorg/unknown-model", offline=True if how == "argument" else None)
    assert "offline" in e.value.message
    assert "HF_HUB_OFFLINE" in e.value.hint


def test_offline_env_read_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not resolve.hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert resolve.hub_offline()


def test_no_network_fails_fast_without_calling_hub(monkeypatch, empty_hub_cache, no_hub):
    monkeypatch.setattr(resolve, "_unreachable", lambda endpoint: "huggingface.co: Name or service not known")
    with pytest.raises(LoraDoctorError, match="could not be reached"):
        resolve_model_config("someorg/unknown-model", offline=False)


def test_unreachable_reports_refused_connection(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    # Port 1 on localhost is closed: refused at once, no wait.
    assert "127.0.0.1" in resolve._unreachable("http://127.0.0.1:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert resolve._unreachable("http://127.0.0.1:1") == ""


def test_hub_errors_become_one_line(monkeypatch, empty_hub_cache):
    def not_found(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find the requested files\nin the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    monkeypatch.setattr(resolve, "_unreachable", lambda endpoint: "")
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config("someorg/unknown-model", offline=False)
    assert "the hub could not be reached" in e.value.message
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("error, why", [
    (lambda: huggingface_hub.errors.EntryNotFoundError("404"), "its hub repo has no config.json"),
    (lambda: huggingface_hub.errors.OfflineModeIsEnabled("offline"), "the hub is disabled (HF_HUB_OFFLINE is set)"),
    (lambda: huggingface_hub.errors.HFValidationError("bad id"), "it is not a valid hub repo id"),
    (lambda: ConnectionResetError("reset by peer"), "the hub failed (ConnectionResetError: reset by peer)"),
])
def test_each_hub_error_names_its_reason(monkeypatch, empty_hub_cache, error, why):
    def fail(repo_id, filename, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr(resolve, "_unreachable", lambda endpoint: "")
    assert resolve._download_config("someorg/unknown-model") == (None, why)


# --- remote code ------------------------------------------------------------------------------

CUSTOM_CONFIG_PY = '''
from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "toy_custom_arch"

    def __init__(self, hidden_size=8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''


def custom_code_model(folder):
    write_config(
        folder,
        {"model_type": "toy_custom_arch", "hidden_size": 16, "auto_map": {"AutoConfig": "configuration_toy.ToyConfig"}},
    )
    (folder / "configuration_toy.py").write_text(CUSTOM_CONFIG_PY)
    return folder


def test_custom_code_needs_trust_remote_code(tmp_path, empty_hub_cache, no_hub):
    folder = custom_code_model(tmp_path / "custom")
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config(str(folder))
    assert "'toy_custom_arch'" in e.value.message
    assert "--trust-remote-code" in e.value.hint


def test_custom_code_loads_when_trusted(tmp_path, empty_hub_cache, no_hub):
    folder = custom_code_model(tmp_path / "custom")
    r = resolve_model_config(str(folder), trust_remote_code=True)
    assert type(r.config).__name__ == "ToyConfig"
    assert r.config.hidden_size == 16


def test_known_model_type_ignores_auto_map_unless_trusted(tmp_path, empty_hub_cache, no_hub):
    """Phi-3's first config.json pointed auto_map at its own code; the native class must be used."""
    folder = tmp_path / "phi3-with-auto-map"
    data = json.loads(resolve.shipped_config_path("microsoft/Phi-3-mini-4k-instruct").read_text())
    data["auto_map"] = {"AutoConfig": "configuration_phi3.Phi3Config"}
    write_config(folder, data)
    (folder / "configuration_phi3.py").write_text("raise RuntimeError('remote code ran')\n")
    r = resolve_model_config(str(folder))
    assert type(r.config).__module__.startswith("transformers.models.phi3")


# --- user errors ------------------------------------------------------------------------------


def test_unknown_model_lists_close_matches(empty_hub_cache, no_hub):
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config("meta-llama/Llama-2-7b", offline=True)
    assert "'meta-llama/Llama-2-7b'" in e.value.message
    assert "meta-llama/Llama-2-7b-hf" in e.value.hint
    assert "at a local model directory (./path/to/model)" in e.value.hint and "lora-doctor plan" not in e.value.hint


def test_unknown_model_without_close_match_lists_some_shipped(empty_hub_cache, no_hub):
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config("zzz/xyzzy", offline=True)
    assert f"and {len(shipped_model_ids()) - 4} more" in e.value.hint


def test_substring_suggestions(empty_hub_cache, no_hub):
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config("mixtral", offline=True)
    assert "mistralai/Mixtral-8x7B-v0.1" in e.value.hint


def test_missing_path(tmp_path, no_hub):
    with pytest.raises(LoraDoctorError, match="does not exist"):
        resolve_model_config(str(tmp_path / "nowhere" / "model"))


def test_directory_without_config(tmp_path, no_hub):
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config(str(tmp_path / "weights-only"))
    assert "has no config.json" in e.value.message
    assert str(tmp_path / "weights-only") in e.value.message


def test_adapter_directory_points_at_base_model(tmp_path, no_hub):
    adapter = tmp_path / "my-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}))
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config(str(adapter))
    assert "PEFT adapter" in e.value.hint
    assert "base model instead: mistralai/Mistral-7B-v0.1" in e.value.hint


def test_parent_of_checkpoints_lists_them(tmp_path, no_hub):
    write_config(tmp_path / "run" / "checkpoint-500")
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config(str(tmp_path / "run"))
    assert f"e.g. {tmp_path / 'run' / 'checkpoint-500'}" in e.value.hint


def test_malformed_json_names_path_and_problem(tmp_path, no_hub):
    path = write_config(tmp_path / "broken", '{"model_type": "llama",\n "hidden_size": 64,,}')
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config(str(tmp_path / "broken"))
    assert str(path) in e.value.message
    assert "not valid JSON" in e.value.message and "line 2" in e.value.message


def test_truncated_json(tmp_path, no_hub):
    write_config(tmp_path / "cut", json.dumps(TINY_LLAMA)[:40])
    with pytest.raises(LoraDoctorError, match="not valid JSON"):
        resolve_model_config(str(tmp_path / "cut" / "config.json"))


def test_unreadable_bytes(tmp_path, no_hub):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LoraDoctorError, match="Cannot read"):
        resolve_model_config(str(path))


def test_json_that_is_not_an_object(tmp_path, no_hub):
    write_config(tmp_path / "list", "[1, 2, 3]")
    with pytest.raises(LoraDoctorError, match="JSON list, not an object"):
        resolve_model_config(str(tmp_path / "list"))


def test_config_without_model_type(tmp_path, no_hub):
    write_config(tmp_path / "untyped", {"hidden_size": 64})
    with pytest.raises(LoraDoctorError, match="has no 'model_type'"):
        resolve_model_config(str(tmp_path / "untyped"))


@pytest.mark.parametrize(
    "override, problem",
    [({"hidden_size": "big"}, "hidden_size"), ({"num_attention_heads": 7}, "not a multiple")],
)
def test_invalid_field_values(override, problem, tmp_path, no_hub):
    write_config(tmp_path / "bad", {**TINY_LLAMA, **override})
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config(str(tmp_path / "bad"))
    assert "not a valid 'llama' config" in e.value.message and problem in e.value.message
    assert "\n" not in str(e.value)


def test_empty_model_name(no_hub):
    with pytest.raises(LoraDoctorError, match="empty"):
        resolve_model_config("  ")


def test_ambiguous_bare_name(tmp_path, monkeypatch, empty_hub_cache, no_hub):
    for org in ("org-a", "org-b"):
        (tmp_path / f"{org}--same-name.json").write_text(json.dumps(TINY_LLAMA))
    monkeypatch.setattr(resolve, "CONFIGS_DIR", tmp_path)
    with pytest.raises(LoraDoctorError) as e:
        resolve_model_config("same-name")
    assert "org-a/same-name" in e.value.message and "org-b/same-name" in e.value.message
    assert resolve_model_config("org-b/same-name").source == "shipped config"


# --- shipped configs --------------------------------------------------------------------------

# Unique parameter elements (tied weights once) from the model cards / safetensors index of each repo.
PUBLISHED_PARAMS = {
    "facebook/opt-125m": 125_239_296,  # lm_head tied to embed_tokens: the weight-tying guard
    "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-2-9b": 9_241_705_984,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-7b-chat-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Meta-Llama-3-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
    "mistralai/Mistral-7B-v0.3": 7_248_023_552,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "openai-community/gpt2": 124_439_808,
    "openai-community/gpt2-medium": 354_823_168,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-1.5B": 1_543_714_304,
    "Qwen/Qwen2.5-3B": 3_085_938_688,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "Qwen/Qwen2.5-14B": 14_770_033_664,
    "Qwen/Qwen2.5-32B": 32_763_876_352,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "tiiuae/falcon-7b": 6_921_720_704,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
}


def test_every_shipped_config_has_a_pinned_count():
    assert sorted(shipped_model_ids(), key=str.lower) == sorted(PUBLISHED_PARAMS, key=str.lower)


@pytest.mark.parametrize("repo_id", sorted(PUBLISHED_PARAMS, key=str.lower))
def test_shipped_config_builds_to_published_param_count(repo_id, empty_hub_cache, no_hub):
    config = resolve_model_config(repo_id).config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # parameters() yields a tied tensor once, so this is the unique count.
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[repo_id]


@pytest.mark.parametrize("repo_id", sorted(PUBLISHED_PARAMS, key=str.lower))
def test_shipped_configs_are_plain_hub_json(repo_id):
    data = json.loads(resolve.shipped_config_path(repo_id).read_text())
    assert "auto_map" not in data, "shipped configs must not point at remote code"
    assert data["architectures"][0].endswith(("ForCausalLM", "LMHeadModel"))


def test_falcon_uses_native_model_type():
    data = json.loads(resolve.shipped_config_path("tiiuae/falcon-7b").read_text())
    assert data["model_type"] == "falcon" and data["new_decoder_architecture"] is False
