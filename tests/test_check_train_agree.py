"""check and train agree (issue 11), pairwise over the whole catalogue.

Every check whose fault can be planted in the files a run reads (run config, data, eval file, tokenizer, model
config, generation_config) is planted here and run through `check` and `train` (the CLI, one optimizer step on a
tiny local model, CPU). The rules:

- whatever train refuses (exit 2), check calls an error (exit 1) or refuses the same input (exit 2);
- whatever check calls healthy (exit 0), train starts and finishes;
- the planted finding has one severity everywhere: check reports it, and train's own report (the doctor after
  the run) holds the same code with the same severity.

Checks whose fault no file can plant (probe-only runtime findings, the GPU, the installed libraries, engine
settings the config cannot change) are listed in EXCLUDED with the reason; the registry must be covered by one
or the other, so a new check has to be classified here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from chat_fixtures import CHATML_TAGGED_EOT_OUTSIDE, CONVERSATION, tiny_chat_model_dir
from lora_doctor.chat.templates import CHATML_TAGGED
from lora_doctor.checks import CHECKS
from lora_doctor.cli import cli

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}."} for i in range(24)]
CHAT_ROWS = [{"messages": [dict(m, content=m["content"] + f" {i}") for m in CONVERSATION]} for i in range(12)]


def _chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@dataclass(frozen=True)
class Case:
    check: str
    """The registry name of the check the fault is planted for."""
    code: str | None
    """The finding it must raise (None: the healthy runs, nothing above info)."""
    severity: str | None = None
    model: str = "llama"
    """A key of _MODELS: which model folder (tokenizer, config, generation_config) the run reads."""
    config: dict = field(default_factory=dict)
    """Dotted config keys over BASE."""
    rows: list | None = None
    """data.path's rows; None for ROWS (CHAT_ROWS when data.format is chat)."""
    eval_rows: list | None = None
    """Rows written to eval.jsonl (data.eval_path: eval.jsonl names it)."""
    slow: bool = False


LONG = "word " * 40
CASES: dict[str, Case] = {
    "healthy": Case("", None),
    "healthy-chat": Case("", None, model="chat", config={"data.format": "chat"}),
    # --- targets -----------------------------------------------------------------------------------------
    "target-not-found": Case("target_not_found", "target-not-found", "error", config={"lora.targets": ["qkv_proj"]}),
    "partial-coverage": Case("partial_coverage", "partial-target-coverage", "error",
                             config={"lora.targets": ["q_proj", "qkv_proj"]}),
    "param-target-dora": Case("param_target_unsupported", "param-target-unsupported", "error", model="mixtral",
                              config={"lora.targets": "all-linear", "lora.use_dora": True}, slow=True),
    # --- training setup ----------------------------------------------------------------------------------
    "merge-reloads": Case("merge_into_4bit", "merge-reloads-base", "info",
                          config={"quant.mode": "nf4", "quant.compute_dtype": "bf16", "output.merge": True}),
    "rank-vs-data": Case("rank_vs_data", "rank-too-large", "warning",
                         config={"lora.r": 64, "lora.targets": "all-linear"}, rows=ROWS[:8]),
    "lr-zero": Case("lr_and_scaling", "lr-not-positive", "error", config={"train.lr": 0.0}),
    "lr-high": Case("lr_and_scaling", "lr-out-of-range", "warning", config={"train.lr": 0.5}),
    "alpha-unusual": Case("lr_and_scaling", "alpha-r-unusual", "warning", config={"lora.alpha": 512}),
    # --- precision ---------------------------------------------------------------------------------------
    "fp16-on-bf16": Case("fp16_precision", "fp16-on-bf16-model", "warning", model="llama-bf16",
                         config={"train.precision": "fp16"}),
    "compute-dtype": Case("compute_dtype_matches_precision", "compute-dtype-mismatch", "warning",
                          config={"quant.mode": "nf4", "quant.compute_dtype": "fp16", "train.precision": "bf16"}),
    # --- tokenizer ---------------------------------------------------------------------------------------
    "no-pad": Case("no_pad_token", "no-pad-token", "info", model="llama-no-pad"),
    "eos-not-appended": Case("eos_learning", "eos-never-learned", "warning", config={"data.add_eos": False}),
    "left-padding": Case("left_padding", "left-padding", "warning", config={"data.padding_side": "left"}),
    "vocab-past-rows": Case("vocab_vs_embeddings", "vocab-mismatch", "warning", model="llama-extra-tokens"),
    "no-eos": Case("no_eos_token", "no-eos-token", "error", model="llama-no-eos"),
    "eos-vs-generation": Case("eos_mismatch", "eos-mismatch", "error", model="llama-gen-eos"),
    "bos-twice": Case("bos_twice", "bos-twice", "warning", model="llama-adds-bos",
                      config={"data.prompt_template": "<s>### Instruction:\n{instruction}\n\n### Response:\n"}),
    "id-past-rows": Case("token_ids_in_range", "token-id-out-of-range", "error", model="llama-extra-tokens",
                         rows=ROWS + [{"instruction": "Say <extra_0>.", "output": "<extra_1>"}]),
    "token-index-past-rows": Case("trainable_token_indices_in_range", "trainable-token-index-out-of-range", "error",
                                  config={"lora.trainable_token_indices": [5, 9999]}),
    # --- dataset -----------------------------------------------------------------------------------------
    "every-response-cut": Case("all_labels_masked", "all-labels-masked", "error", config={"data.max_length": 4}),
    "some-truncated": Case("truncation", "examples-truncated", "warning",
                           rows=ROWS[:16] + [{"instruction": "Count.", "output": LONG} for _ in range(8)]),
    "empty-fields": Case("dataset_format", "empty-fields", "warning",
                         rows=ROWS + [{"instruction": "Say hi.", "output": ""}]),
    # --- length ------------------------------------------------------------------------------------------
    "max-length-beyond": Case("context_length", "beyond-context", "error", config={"data.max_length": 512}),
    "example-beyond": Case("context_length", "beyond-context", "error", model="gpt2",
                           config={"data.max_length": 512}, rows=ROWS + [{"instruction": LONG * 2, "output": LONG}]),
    "some-prompts-fill": Case("prompt_fills_max_length", "prompt-fills-max-length", "warning",
                              rows=ROWS + [{"instruction": LONG * 2, "output": "ok"} for _ in range(3)]),
    # --- data quality ------------------------------------------------------------------------------------
    "duplicates": Case("duplicate_rows", "duplicate-rows", "warning", rows=ROWS + ROWS[:6]),
    "echo": Case("echo_responses", "response-repeats-prompt", "warning",
                 rows=ROWS + [{"instruction": f"Repeat this sentence {i}.", "output": f"Repeat this sentence {i}."}
                              for i in range(4)]),
    "mixed-templates": Case("mixed_templates", "mixed-templates", "warning",
                            rows=ROWS + [{"instruction": f"USER: add {i}\nASSISTANT:", "output": "ok"}
                                         for i in range(4)]),
    "all-empty": Case("empty_responses", "empty-responses", "error",
                      rows=[{"instruction": f"Q {i}.", "output": ""} for i in range(24)]),
    "eval-empty": Case("eval_set", "eval-set-empty", "error", config={"data.eval_path": "eval.jsonl"}, eval_rows=[]),
    "eval-overlap": Case("eval_set", "eval-overlaps-train", "warning", config={"data.eval_path": "eval.jsonl"},
                         eval_rows=ROWS[:4]),
    # --- schedule ----------------------------------------------------------------------------------------
    "warmup": Case("warmup_vs_run", "warmup-exceeds-run", "warning", config={"train.warmup_steps": 100}),
    "one-step": Case("few_optimizer_steps", "few-optimizer-steps", "error",
                     config={"train.max_steps": None, "train.batch": 8, "train.grad_accum": 4}),
    "eval-every-no-set": Case("eval_without_eval_set", "eval-without-eval-set", "warning",
                              config={"train.eval_every": 1}),
    "steps-before-epochs": Case("epochs_vs_max_steps", "max-steps-before-epochs", "warning",
                                config={"train.epochs": 3}),
    # --- MoE ---------------------------------------------------------------------------------------------
    "router": Case("router_adapted", "router-adapted", "info", model="mixtral", config={"lora.targets": "all-linear"},
                   slow=True),
    # --- chat --------------------------------------------------------------------------------------------
    "chat-as-instruction": Case("chat_format_mismatch", "chat-format-mismatch", "error", model="chat", rows=CHAT_ROWS),
    "chat-no-template": Case("chat_no_template", "chat-no-template", "error", config={"data.format": "chat"}),
    "chat-mask-empty": Case("chat_assistant_mask", "chat-mask-empty", "error", model="chat", config={
        "data.format": "chat", "data.chat_template": CHATML_TAGGED.replace(
            "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}",
            "{{ message['content'] + '<|im_end|>\\n' }}{% generation %}{% endgeneration %}")}),
    "chat-eot-outside": Case("chat_eot_supervised", "chat-eot-unsupervised", "error", model="chat",
                             config={"data.format": "chat", "data.chat_template": CHATML_TAGGED_EOT_OUTSIDE}),
    "chat-truncated": Case("chat_truncation", "chat-truncated", "warning", model="chat",
                           config={"data.format": "chat"},
                           rows=CHAT_ROWS + [_chat(("user", "Count."), ("assistant", LONG * 2))]),
    "chat-pad-is-eot": Case("chat_pad_is_eot", "chat-pad-is-eot", "info", model="chat-pad-eot",
                            config={"data.format": "chat"}),
    "chat-bos-twice": Case("chat_bos_twice", "chat-bos-twice", "warning", model="chat",
                           config={"data.format": "chat", "data.chat_template": "{{ bos_token }}{{ bos_token }}"
                                   + CHATML_TAGGED}),
    "chat-empty-assistant": Case("chat_empty_assistant", "chat-empty-assistant", "warning", model="chat",
                                 config={"data.format": "chat"},
                                 rows=CHAT_ROWS + [_chat(("user", f"Hi {i}."), ("assistant", "")) for i in range(6)]),
    "chat-roles": Case("chat_roles_alternate", "chat-roles-alternate", "warning", model="chat",
                       config={"data.format": "chat"},
                       rows=CHAT_ROWS + [_chat(("user", "a"), ("user", "b"), ("assistant", "c"))]),
    "chat-no-assistant": Case("chat_no_assistant_turn", "chat-no-assistant-turn", "warning", model="chat",
                              config={"data.format": "chat"}, rows=CHAT_ROWS + [_chat(("user", "Anyone?"))]),
    "chat-token-missing": Case("chat_special_token_missing", "chat-special-token-missing", "error", model="chat",
                               config={"data.format": "chat",
                                       "data.chat_template": CHATML_TAGGED.replace("<|im_start|>", "<|turn|>")}),
    "chat-token-past-rows": Case("chat_special_token_outside_embedding", "chat-special-token-outside-embedding",
                                 "error", model="chat-extra-tokens", config={
                                     "data.format": "chat",
                                     "data.chat_template": CHATML_TAGGED.replace("<|im_start|>", "<extra_0>")}),
    "chat-empty-think": Case("chat_empty_think", "chat-empty-think", "warning", model="chat", config={
        "data.format": "chat", "data.chat_template": CHATML_TAGGED.replace(
            "{% generation %}{{ message['content']", "{% generation %}{{ '<think>\\n\\n</think>\\n\\n' + "
            "message['content']")}),
}

EXCLUDED: dict[str, str] = {
    "zero_trainable": "the engine builds the adapter with peft from lora.*: a target that matches leaves lora_ "
                      "weights trainable; 0 trainable needs user code (a model hook), tested in test_checks",
    "grad_ckpt_input_grads": "the engine always checkpoints non-reentrantly with input grads (loading.py); no "
                             "config key plants reentrant checkpointing",
    "memory_fit": "a GPU-memory verdict: this CPU machine has no GPU to run out of (probe's out-of-memory "
                  "finding is the runtime side, test_probe_cli)",
    "device_map_distributed": "the engine loads one copy per process ({'': LOCAL_RANK}); no key changes it",
    "fsdp_incompatible": "train refuses it only when launched on several processes (torchrun); this one-process "
                         "CLI train runs FSDP unsharded. test_fsdp checks check's finding against the engine's "
                         "refusal, word for word",
    "bf16_support": "reads the GPU's compute capability (or the --gpu name), not a file",
    "bitsandbytes": "reads the installed bitsandbytes, not a file",
    "untrained_label_tokens": "needs the embedding weights: check loads none by design; probe/train read them "
                              "(test_checks::15-untrained-rows)",
    "untrained_input_tokens": "needs the embedding weights: check loads none by design; probe/train read them "
                              "(test_checks_more::untrained-inputs)",
    "adapter_gradients": "a probe/train runtime measurement (gradients after step 0)",
    "loss_finite": "a probe/train runtime measurement (the loss trace)",
    "loss_moving": "a probe/train runtime measurement (the loss trace)",
}


def test_every_check_is_planted_here_or_excluded_with_a_reason():
    planted = {c.check for c in CASES.values() if c.check}
    assert not planted & set(EXCLUDED), planted & set(EXCLUDED)
    assert planted | set(EXCLUDED) == set(CHECKS), sorted(set(CHECKS) - planted - set(EXCLUDED))
    assert all(len(reason) > 20 for reason in EXCLUDED.values())


# --- the model folders -------------------------------------------------------------------------------------


def _copy(src, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _retokenize(folder: Path, edit) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    edit(tok)
    tok.save_pretrained(folder)
    return folder


def _prepend_bos(tok) -> None:
    """As Llama's tokenizer.json does: the tokenizer itself writes BOS before every text."""
    from tokenizers.processors import TemplateProcessing

    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])


def _build(name: str, root: Path, llama: Path) -> Path:
    from lora_doctor.tiny import save_tiny_model

    out = root / name
    if name == "llama":
        return llama
    if name == "chat":
        return Path(tiny_chat_model_dir())
    if name in ("gpt2", "mixtral"):
        return save_tiny_model(out, name)
    if name == "llama-bf16":
        _edit_json(_copy(llama, out) / "config.json", dtype="bfloat16")
        return out
    if name == "llama-gen-eos":
        _edit_json(_copy(llama, out) / "generation_config.json", eos_token_id=7)
        return out
    if name == "llama-no-pad":
        return _retokenize(_copy(llama, out), lambda t: setattr(t, "pad_token", None))
    if name == "llama-no-eos":
        return _retokenize(_copy(llama, out), lambda t: setattr(t, "eos_token", None))
    if name == "llama-extra-tokens":
        return _retokenize(_copy(llama, out), lambda t: t.add_tokens(["<extra_0>", "<extra_1>"]))
    if name == "llama-adds-bos":
        return _retokenize(_copy(llama, out), _prepend_bos)
    if name == "chat-pad-eot":
        return _retokenize(_copy(tiny_chat_model_dir(), out), lambda t: setattr(t, "pad_token", t.eos_token))
    if name == "chat-extra-tokens":
        return _retokenize(_copy(tiny_chat_model_dir(), out),
                           lambda t: t.add_special_tokens({"additional_special_tokens": ["<extra_0>"]}))
    raise KeyError(name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_dir):
    root, built = tmp_path_factory.mktemp("agree-models"), {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = _build(name, root, Path(tiny_llama_dir))
        return built[name]

    return get


# --- the two commands --------------------------------------------------------------------------------------

BASE = {"quant.mode": None, "lora.r": 4, "lora.dropout": 0.0, "train.batch": 2,
        "train.max_steps": 1, "train.lr": 2e-4, "train.optim": "adamw", "output.plot": False}


def write_config(tmp_path: Path, model: Path, case: Case) -> Path:
    values = {**BASE, "model": str(model), **case.config}
    chat = values.get("data.format") == "chat"
    values.setdefault("data.max_length", 256 if chat else 64)  # a conversation is ~4x an instruction row
    rows = case.rows if case.rows is not None else (CHAT_ROWS if chat else ROWS)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    values["data.path"] = str(data)
    if case.eval_rows is not None:
        (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in case.eval_rows))
        values["data.eval_path"] = str(tmp_path / "eval.jsonl")
    values.update({"output.dir": str(tmp_path / "run"), "output.reports_dir": str(tmp_path / "reports")})
    nested: dict = {}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name] = value
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(nested))  # JSON is YAML
    return path


def run_both(tmp_path: Path, model: Path, case: Case):
    """(check exit, check findings {code: severity}, train exit, train report findings, outputs)."""
    cfg = write_config(tmp_path, model, case)
    check = CliRunner().invoke(cli, ["check", str(cfg), "--json"])
    train = CliRunner().invoke(cli, ["train", str(cfg)])
    assert "Traceback" not in check.output + train.output, (check.output, train.output)
    assert check.exit_code in (0, 1, 2) and train.exit_code in (0, 2), (check.output, train.output)
    check_found = {}
    if check.exit_code != 2:
        check_found = {f["code"]: f["severity"] for f in json.loads(check.stdout)["findings"]}
    train_found = {}
    if train.exit_code == 0:
        (report,) = (tmp_path / "reports").glob("train-*.json")
        train_found = {f["code"]: f["severity"] for f in json.loads(report.read_text())["findings"]}
    return check, check_found, train, train_found


def _params():
    return [pytest.param(name, marks=pytest.mark.slow) if c.slow else name for name, c in CASES.items()]


@pytest.mark.parametrize("name", _params())
def test_check_and_train_agree(name, tmp_path, model_dir, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)
    check, check_found, train, train_found = run_both(tmp_path, model_dir(case.model), case)
    if train.exit_code != 0:
        assert check.exit_code != 0, f"train refused but check called it healthy:\n{train.output}\n{check.stdout}"
    if check.exit_code == 0:
        assert train.exit_code == 0, f"check called it healthy but train refused:\n{train.output}"
    if case.code is None:
        for found in (check_found, train_found):
            assert not {c for c, s in found.items() if s != "info"} - PROBE_CODES, found
        assert check.exit_code == 0 and train.exit_code == 0
        return
    if check.exit_code == 2:  # the same bad input: check refuses it as train does, with one line
        assert train.exit_code == 2, (check.output, train.output)
        return
    assert check_found.get(case.code) == case.severity, (case.code, check_found, check.stdout[-2000:])
    assert (check.exit_code == 1) == ("error" in check_found.values())
    if train.exit_code == 0:
        assert train_found.get(case.code) == case.severity, (case.code, train_found)
    else:
        assert case.severity == "error", f"train refused a {case.severity}:\n{train.output}"


PROBE_CODES = {"loss-flat", "adapter-unchanged", "adapter-no-grad"}
"""Runtime findings of one optimizer step, which the healthy run may raise (a 1-step run moves nothing)."""
