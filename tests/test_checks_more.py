"""Issue 11's classes: EOS/BOS, special tokens, length, data quality, eval set, schedule, MoE router.

Each class has planted faults (several members where the class has several) and a healthy twin; the facts
are also read from real records (data files, tokenizers, model files) through build_context.
"""

import json
import re
from pathlib import Path

import pytest

from lora_doctor.checks import CHECKS, Severity, build_context, run_checks
from test_checks import _shape, codes, healthy_context


@pytest.fixture(scope="module")
def shapes():
    return {arch: _shape(arch) for arch in ("llama", "mixtral")}


@pytest.fixture()
def healthy(shapes):
    return wider_healthy(shapes["llama"])


def wider_healthy(shape):
    """test_checks' healthy context plus every new fact, all of them healthy."""
    return healthy_context(shape).replace(
        data_format="instruction", add_eos=True, response_field="output", bos_token_id=1,
        config_eos_token_ids=(2,), generation_eos_token_ids=(2,), max_positions=4096, input_id_max=400,
        input_id_max_origin="d.jsonl:7", n_double_bos=0, n_beyond_context=0, n_prompt_fills=0, n_rows=1000,
        n_duplicate_rows=0, n_echo_responses=0, template_markers={}, prompt_family="alpaca", eval_path=None,
        n_eval_examples=50, n_eval_overlap=0, eval_fraction=0.05, grad_accum=4, warmup_steps=10, max_steps=None,
        epochs=1.0, eval_every=20, untrained_input_tokens={},
    )


# (expected code, severity, planted fault); ids are what docs/checks.md cites.
PLANTED = {
    "no-eos": ("no-eos-token", "error", dict(eos_token=None, eos_token_id=None, labels=None)),
    "no-eos-text": ("no-eos-token", "warning", dict(eos_token=None, eos_token_id=None, labels=None, data_format="text")),
    "eos-vs-generation": ("eos-mismatch", "error", dict(generation_eos_token_ids=(107,))),
    "eos-vs-config": ("eos-mismatch", "error", dict(generation_eos_token_ids=None, config_eos_token_ids=(128001,))),
    "eos-config-only": ("eos-mismatch", "warning", dict(generation_eos_token_ids=(2, 107), config_eos_token_ids=(107,))),
    "eos-not-in-labels": ("eos-never-learned", "warning", dict(labels=[[-100, 17, 18], [-100, 40]], add_eos=False)),
    "bos-twice": ("bos-twice", "warning", dict(n_double_bos=1000)),
    "id-out-of-range": ("token-id-out-of-range", "error", dict(input_id_max=512)),
    "token-index-past-rows": ("trainable-token-index-out-of-range", "error",
                              dict(trainable_token_indices=[5, 512])),
    "token-index-past-rows-dict": ("trainable-token-index-out-of-range", "error",
                                   dict(trainable_token_indices={"embed_tokens": [9000]})),
    "vocab-past-rows-unused": ("vocab-mismatch", "warning", dict(vocab_len=600)),
    "vocab-past-rows-used": ("vocab-mismatch", "error", dict(vocab_len=600, input_id_max=599)),
    "untrained-inputs": ("untrained-input-embeddings", "warning", dict(untrained_input_tokens={32000: 0.0})),
    "untrained-labels": ("untrained-token-embeddings", "warning", dict(untrained_label_tokens={2: 0.001})),
    "beyond-context": ("beyond-context", "error", dict(max_positions=256, max_length=512, n_beyond_context=12)),
    "max-length-beyond": ("beyond-context", "error", dict(max_positions=256, max_length=512, n_beyond_context=0)),
    "prompt-fills": ("prompt-fills-max-length", "warning", dict(n_prompt_fills=40, n_response_lost=40)),
    "prompt-fills-all": ("prompt-fills-max-length", "error", dict(n_prompt_fills=1000)),
    "duplicates": ("duplicate-rows", "warning", dict(n_duplicate_rows=300)),
    "few-duplicates": ("duplicate-rows", "info", dict(n_duplicate_rows=3)),
    "echo": ("response-repeats-prompt", "warning", dict(n_echo_responses=200)),
    "echo-all": ("response-repeats-prompt", "error", dict(n_echo_responses=1000)),
    "mixed-templates": ("mixed-templates", "warning", dict(template_markers={"vicuna": 400, "alpaca": 300})),
    "template-in-fields": ("mixed-templates", "warning", dict(template_markers={"chatml": 1000})),
    "template-twice": ("mixed-templates", "warning", dict(template_markers={"alpaca": 1000})),
    "most-empty": ("empty-responses", "warning", dict(empty_fields={"output": 700})),
    "all-empty": ("empty-responses", "error", dict(empty_fields={"output": 1000})),
    "eval-missing": ("eval-set-missing", "error", dict(eval_path="nope.jsonl", eval_path_exists=False)),
    "eval-empty": ("eval-set-empty", "error", dict(eval_path="e.jsonl", eval_path_exists=True, n_eval_rows=0)),
    "eval-overlap": ("eval-overlaps-train", "warning", dict(n_eval_overlap=20)),
    "warmup": ("warmup-exceeds-run", "warning", dict(warmup_steps=100)),
    "warmup-max-steps": ("warmup-exceeds-run", "warning", dict(warmup_steps=50, max_steps=30)),
    "one-step": ("few-optimizer-steps", "error", dict(n_examples=16, batch_size=4, grad_accum=4)),
    "few-steps-ddp": ("few-optimizer-steps", "warning", dict(n_examples=256, batch_size=4, grad_accum=4, world_size=8,
                                                             local_rank=0, device_map={"": 0})),
    "eval-every-no-set": ("eval-without-eval-set", "warning", dict(eval_fraction=0.0, n_eval_examples=0)),
    "steps-repeat-data": ("max-steps-repeats-data", "info", dict(max_steps=500)),
    "steps-before-epochs": ("max-steps-before-epochs", "warning", dict(max_steps=20, epochs=3.0)),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_planted_fault_is_found(case, healthy):
    code, severity, fault = PLANTED[case]
    assert code not in codes(run_checks(healthy)), "the healthy context must not raise it"
    found = [f for f in run_checks(healthy.replace(**fault)) if f.code == code]
    assert found, f"{code} not raised"
    assert found[0].severity.value == severity
    assert len(found[0].message) > 30 and len(found[0].hint) > 10


def test_wider_healthy_context_has_nothing_above_info(healthy):
    findings = run_checks(healthy)
    assert all(f.severity is Severity.INFO for f in findings), [f.code for f in findings]


def test_router_adapted_on_moe_all_linear(healthy, shapes):
    from lora_doctor.introspect import resolve_targets

    moe = shapes["mixtral"]
    ctx = healthy.replace(shape=moe, model_id=moe.model_id, resolved_targets=resolve_targets(moe, "all-linear"))
    (f,) = [f for f in run_checks(ctx) if f.code == "router-adapted"]
    assert f.severity is Severity.INFO and "gate.weight" in f.message and "gate.weight" not in f.hint
    attn = ctx.replace(resolved_targets=resolve_targets(moe, "attn"))
    assert "router-adapted" not in codes(run_checks(attn))
    dense = healthy.replace(resolved_targets=("gate_proj", "up_proj"))
    assert "router-adapted" not in codes(run_checks(dense))


# --- the hints name the right knob -----------------------------------------------------------------------


def test_warmup_fix_names_warmup_not_lr(healthy):
    (f,) = [f for f in run_checks(healthy.replace(warmup_steps=100)) if f.code == "warmup-exceeds-run"]
    assert "--warmup" in f.hint and "--lr " not in f.hint and "63 optimizer steps" in f.message


def test_one_step_fix_lowers_grad_accum(healthy):
    (f,) = [f for f in run_checks(healthy.replace(n_examples=16, batch_size=4, grad_accum=4))
            if f.code == "few-optimizer-steps"]
    assert "1 optimizer step" in f.message and "--epochs" in f.hint


def test_eos_mismatch_names_which_to_align(healthy):
    (gen,) = [f for f in run_checks(healthy.replace(generation_eos_token_ids=(107,))) if f.code == "eos-mismatch"]
    assert "generation_config.eos_token_id" in gen.hint
    (conf,) = [f for f in run_checks(healthy.replace(generation_eos_token_ids=None, config_eos_token_ids=(9,)))
               if f.code == "eos-mismatch"]
    assert "config.eos_token_id" in conf.hint and "generation_config" not in conf.hint
    listed = healthy.replace(generation_eos_token_ids=(128001, 128008, 2))
    assert "eos-mismatch" not in codes(run_checks(listed))


HINT_KEY = re.compile(r"(?<![\w.])((?:model|quant|lora|data|train|loss|output)\.[a-z_]+)\b(?!\()")
"""A dotted config key as a hint writes it (data.eval_fraction: 0.05); not code (model.parameters(), p.data)."""


def _all_planted_contexts(healthy, shapes):
    from test_checks import PLANTED as BASE

    out = [healthy]
    for _, _, fault in [*BASE.values(), *PLANTED.values()]:
        fault = dict(fault)
        if "shape" in fault:
            fault["shape"] = _shape(fault["shape"]) if fault["shape"] not in shapes else shapes[fault["shape"]]
        out.append(healthy.replace(**fault))
    return out


def test_every_dotted_config_key_a_hint_names_exists(healthy, shapes):
    """A hint that names a config key (data.eval_fraction) names one RunConfig has (runconfig.valid_keys)."""
    from lora_doctor.runconfig import valid_keys

    named = set()
    for ctx in _all_planted_contexts(healthy, shapes):
        for f in run_checks(ctx):
            named |= set(HINT_KEY.findall(f.hint))
    assert {"data.eval_fraction", "data.response_field"} <= named
    assert not named - set(valid_keys()), sorted(named - set(valid_keys()))


def test_new_hints_name_flags_of_check_probe_and_train(healthy, shapes):
    from lora_doctor.cli import cli

    opts = [{o for p in cli.get_command(None, c).params for o in (*p.opts, *p.secondary_opts)}
            for c in ("check", "probe", "train")]
    static = [n for n, fn in CHECKS.items() if not fn.__module__.endswith(".probe")]  # probe's own: --steps
    flags = {flag for ctx in _all_planted_contexts(healthy, shapes) for f in run_checks(ctx, only=static)
             for flag in re.findall(r"--[a-z][a-z0-9-]*", f.hint.split("lora-doctor plan")[0])}
    assert "--warmup" in flags and not [f for f in flags if not all(f in o for o in opts)]


# --- facts from the real records ------------------------------------------------------------------------


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tmp_path, rows, **data):
    from lora_doctor.runconfig import from_dict

    path = _write(tmp_path / "d.jsonl", rows)
    return from_dict({"model": "tiny", "data": {"path": str(path), "max_length": 64, **data},
                      "train": {"batch": 2}})


def test_data_quality_facts_from_a_real_file(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"Name colour {i}.", "output": "Blue."} for i in range(6)]
    rows += [rows[0]] * 4  # duplicates
    rows += [{"instruction": "Repeat after me: the quick fox.", "output": "Repeat after me: the quick fox."}]
    rows += [{"instruction": "USER: hi\nASSISTANT:", "output": "hello"}]
    ctx = build_context(config=_cfg(tmp_path, rows), tokenizer=tiny_tokenizer)
    assert ctx.n_rows == 12 and ctx.n_duplicate_rows == 4 and ctx.n_echo_responses == 1
    assert ctx.template_markers == {"vicuna": 1} and ctx.prompt_family == "alpaca"
    found = codes(run_checks(ctx))
    assert {"duplicate-rows", "response-repeats-prompt", "mixed-templates"} <= found


def test_clean_file_gives_no_data_quality_finding(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}."} for i in range(20)]
    ctx = build_context(config=_cfg(tmp_path, rows), tokenizer=tiny_tokenizer)
    assert ctx.n_duplicate_rows == 0 and ctx.n_double_bos == 0 and ctx.input_id_max < len(tiny_tokenizer)
    assert not codes(run_checks(ctx)) & {"duplicate-rows", "response-repeats-prompt", "mixed-templates",
                                         "bos-twice", "token-id-out-of-range", "prompt-fills-max-length",
                                         "eval-set-missing", "eval-overlaps-train", "empty-responses"}


def test_double_bos_read_off_the_token_ids(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"Say {i}.", "output": "ok"} for i in range(4)]
    cfg = _cfg(tmp_path, rows, prompt_template="<s><s>### Instruction:\n{instruction}\n\n### Response:\n")
    ctx = build_context(config=cfg, tokenizer=tiny_tokenizer)
    assert ctx.n_double_bos == 4 and "bos-twice" in codes(run_checks(ctx))


def test_prompt_that_fills_max_length_is_counted(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "word " * 80, "output": "ok"}, {"instruction": "Hi.", "output": "ok"}]
    ctx = build_context(config=_cfg(tmp_path, rows), tokenizer=tiny_tokenizer)
    assert ctx.n_prompt_fills == 1


def test_eval_file_missing_empty_and_overlapping(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}."} for i in range(20)]
    missing = build_context(config=_cfg(tmp_path, rows, eval_path=str(tmp_path / "nope.jsonl")),
                            tokenizer=tiny_tokenizer)
    assert missing.eval_path_exists is False and "eval-set-missing" in codes(run_checks(missing))
    (tmp_path / "empty.jsonl").write_text("")
    empty = build_context(config=_cfg(tmp_path, rows, eval_path=str(tmp_path / "empty.jsonl")),
                          tokenizer=tiny_tokenizer)
    assert empty.n_eval_rows == 0 and "eval-set-empty" in codes(run_checks(empty))
    _write(tmp_path / "e.jsonl", rows[:5] + [{"instruction": "New one.", "output": "x"}])
    overlap = build_context(config=_cfg(tmp_path, rows, eval_path=str(tmp_path / "e.jsonl")),
                            tokenizer=tiny_tokenizer)
    assert overlap.n_eval_examples == 6 and overlap.n_eval_overlap == 5
    assert "eval-overlaps-train" in codes(run_checks(overlap))


def test_check_cli_refuses_a_missing_eval_file_as_bad_input(tmp_path, tiny_llama_dir):
    """A missing eval file is bad input, as a missing data file is: one line naming data.eval_path, exit 2
    (train refuses it the same way before loading anything)."""
    from click.testing import CliRunner

    from lora_doctor.cli import cli

    data = _write(tmp_path / "d.jsonl", [{"instruction": f"Add {i}.", "output": f"{i}."} for i in range(24)])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\nquant: {{mode: nf4, compute_dtype: bf16}}\n"
                   f"data: {{path: {data}, eval_path: {tmp_path / 'nope.jsonl'}, max_length: 64}}\n"
                   f"train: {{batch: 2}}\noutput: {{reports_dir: {tmp_path / 'r'}}}\n")
    res = CliRunner().invoke(cli, ["check", str(cfg), "--json"])
    assert res.exit_code == 2, res.output
    assert "data.eval_path" in res.output and "nope.jsonl" in res.output and "Traceback" not in res.output


def test_eos_ids_and_context_from_the_model_files(tmp_path, tiny_llama_dir, tiny_tokenizer):
    from lora_doctor.runconfig import from_dict

    cfg = from_dict({"model": str(tiny_llama_dir)})
    ctx = build_context(config=cfg, tokenizer=tiny_tokenizer)
    assert ctx.config_eos_token_ids == (tiny_tokenizer.eos_token_id,) and ctx.max_positions == 256
    assert "eos-mismatch" not in codes(run_checks(ctx))
    long = build_context(config=cfg.replace(**{"data.max_length": 512}), tokenizer=tiny_tokenizer)
    assert "beyond-context" in codes(run_checks(long))


def test_tokenizer_without_eos_is_an_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    ctx = build_context(tokenizer=tok)
    (f,) = [f for f in run_checks(ctx) if f.code == "no-eos-token"]
    assert f.severity is Severity.ERROR


def test_untrained_rows_zero_and_mean_initialised():
    import torch

    from lora_doctor.checks.build import untrained_rows
    from lora_doctor.tiny import build_tiny_model

    model = build_tiny_model("llama")
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[5].zero_()
        w[7].copy_(w.mean(dim=0))
    bad = untrained_rows(model, {5, 7, 9})
    assert set(bad) == {5, 7}


def test_optimizer_steps_match_the_engine():
    from lora_doctor.checks.datafacts import optimizer_steps

    # engine.Engine.total_steps: ceil(epochs * ceil(n / (batch * world)) / grad_accum), or max_steps.
    assert optimizer_steps(100, 4, 2, 3, 1.0, None) == 5
    assert optimizer_steps(100, 4, 1, 1, 2.0, None) == 50
    assert optimizer_steps(100, 4, 1, 1, 2.0, 7) == 7


# --- the catalogue document ---------------------------------------------------------------------------------


def test_every_check_is_documented_with_a_real_planting_test():
    from lora_doctor.checks.catalogue import ENTRIES, codes_and_severities

    assert set(ENTRIES) == set(CHECKS)
    root = Path(__file__).resolve().parent.parent
    for name, entry in ENTRIES.items():
        path, case = entry.test.split("::")
        assert case in (root / path).read_text(encoding="utf-8"), (name, entry.test)
        assert codes_and_severities(name), name


def test_docs_checks_md_is_up_to_date():
    from lora_doctor.checks.catalogue import markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "checks.md"
    assert doc.read_text(encoding="utf-8") == markdown(), "run: python scripts/gen_checks_docs.py"


def test_chat_rows_are_compared_whole_for_duplicates():
    """Chat rows have no instruction/text columns: distinct conversations are not duplicates, repeated ones are."""
    from lora_doctor.checks.datafacts import row_facts
    from lora_doctor.runconfig import from_dict

    cfg = from_dict({"model": "m", "data": {"path": "x.jsonl", "format": "chat"}})
    convo = [{"role": "user", "content": "hi <|im_start|>"}, {"role": "assistant", "content": "hello"}]
    other = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    distinct = row_facts([("a:1", {"messages": convo}), ("a:2", {"messages": other})], cfg)
    assert distinct["n_duplicate_rows"] == 0 and distinct["template_markers"] == {}
    repeated = row_facts([("a:1", {"messages": convo}), ("a:2", {"messages": convo}), ("a:3", {"messages": other})], cfg)
    assert repeated["n_duplicate_rows"] == 1


def test_duplicates_across_the_eval_fraction_split_overlap(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Same question.", "output": "Same answer."}] * 10
    rows += [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}."} for i in range(10)]
    ctx = build_context(config=_cfg(tmp_path, rows, eval_fraction=0.5), tokenizer=tiny_tokenizer)
    assert ctx.n_eval_overlap and "eval-overlaps-train" in codes(run_checks(ctx))


def test_untrained_rows_hints_name_the_lora_keys_and_the_keys_silence_them(healthy):
    from lora_doctor.checks.build import context_from_config
    from lora_doctor.runconfig import from_dict

    planted = healthy.replace(untrained_input_tokens={32000: 0.0, 32001: 0.0})
    (f,) = [f for f in run_checks(planted) if f.code == "untrained-input-embeddings"]
    assert "lora.trainable_token_indices: [32000, 32001]" in f.hint and "lora.modules_to_save: [" in f.hint
    # Rows trained by the config keys, as the engine passes them to peft, are no longer untrained.
    cfg = from_dict({"model": "m", "lora": {"trainable_token_indices": [32000, 32001]}})
    covered = planted.replace(**{k: context_from_config(cfg)[k] for k in ("modules_to_save", "trainable_token_indices")})
    assert "untrained-input-embeddings" not in codes(run_checks(covered))
    partly = planted.replace(trainable_token_indices={"embed_tokens": (32000,)})
    (f,) = [f for f in run_checks(partly) if f.code == "untrained-input-embeddings"]
    assert "[32001]" in f.hint
    saved = from_dict({"model": "m", "lora": {"modules_to_save": ["embed_tokens", "lm_head"]}})
    assert "untrained-input-embeddings" not in codes(run_checks(planted.replace(
        modules_to_save=context_from_config(saved)["modules_to_save"])))
